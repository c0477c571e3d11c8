"""Resolve a preset (a name or a .toml path) plus `--set key=value` overrides into a validated RunConfig.

Layers, lowest first: schema defaults < the `extends` chain < the preset's own file < `--set`. The merged `shape`
then names presets/shapes/<shape>.toml, whose [model] sits under the preset's [model] and `--set model.*`.
Each layer is checked as it is read, so an error names the file (or "--set") the bad key came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from model.config import ModelConfig
from model.errors import UserError, unknown_key
from presets.schema import CHOICES, RunConfig

PRESET_DIR = Path(__file__).resolve().parent
SHAPE_DIR = PRESET_DIR / "shapes"
SET = "--set"  # the source named in errors about command-line overrides
DEFAULT_PRESET = "cpu"  # what every command uses without --preset


def _schema(cls: type, prefix: str = "") -> dict[str, type]:
    """Every dotted key under `cls` -> its type; a table's key maps to its dataclass."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], prefix + f.name
        keys[key] = kind
        if dataclasses.is_dataclass(kind):
            keys.update(_schema(kind, key + "."))
    return keys


KEYS = _schema(RunConfig)
del KEYS["name"]  # not settable: a run is named after its preset
TYPE_NAMES = {
    int: "an integer", float: "a number", bool: "true or false", str: "a string", list[str]: "a list of strings",
    list[float]: "a list of numbers", list[int]: "a list of integers",
}
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def names() -> list[str]:
    """The built-in hardware presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def shapes() -> list[str]:
    """The built-in model shapes."""
    return sorted(p.stem for p in SHAPE_DIR.glob("*.toml"))


def shape(name: str) -> ModelConfig:
    """The ModelConfig a named shape describes."""
    if name not in shapes():
        raise UserError(f"unknown shape {name!r}; available: {', '.join(shapes())}")
    return _model_config(_read_shape(name), source=_show(SHAPE_DIR / f"{name}.toml"))


def load(name_or_path: str | Path = DEFAULT_PRESET, overrides: Iterable[str] = ()) -> RunConfig:
    """Resolve a hardware preset (a built-in name or a path to a .toml file) and `--set` overrides to a RunConfig.

    Raises UserError, naming the key and where it came from, for anything that does not fit the schema.
    """
    path = _locate(str(name_or_path), base=Path.cwd(), asked_by="")
    merged: dict = {}
    for layer in (*_chain(path, seen=()), _parse_overrides(overrides)):
        merged = _merge(merged, layer)
    model = _merge(_read_shape(merged.get("shape", RunConfig.shape)), merged.pop("model", {}))
    cfg = _build(RunConfig, {**merged, "name": path.stem})
    cfg.model = _model_config(model, source=f"preset {path.stem}")
    _check_plan(cfg)
    return cfg


def as_dict(cfg: RunConfig) -> dict:
    """The fully resolved values as nested plain dicts, for `n3 presets show` and JSON."""
    return dataclasses.asdict(cfg)


# --- reading files ---------------------------------------------------------------------------------------------


def _locate(ref: str, base: Path, asked_by: str) -> Path:
    """A preset reference is a path when it looks like one (has a / or ends in .toml), else a built-in name."""
    where = f" ({asked_by})" if asked_by else ""
    if "/" in ref or ref.endswith(".toml"):
        path = (base / Path(ref).expanduser()).resolve()
        if not path.is_file():
            raise UserError(f"preset file {ref} not found{where}")
        return path
    path = PRESET_DIR / f"{ref}.toml"
    if not path.is_file():
        raise UserError(f"unknown preset {ref!r}{where}; available: {', '.join(names())} (or a path to a .toml file)")
    return path


def _chain(path: Path, seen: tuple[Path, ...]) -> list[dict]:
    """The checked contents of `path` and of everything it extends, the farthest ancestor first."""
    if path in seen:
        raise UserError("extends cycle: " + " -> ".join(_show(p) for p in (*seen, path)))
    source = _show(path)
    data = _read(path)
    parent = data.pop("extends", None)
    _check(data, source)
    if parent is None:
        return [data]
    if not isinstance(parent, str):
        raise UserError(f"'extends' in {source} must be a preset name or a path, got {parent!r}")
    return [*_chain(_locate(parent, base=path.parent, asked_by=f"extends in {source}"), (*seen, path)), data]


def _read_shape(name: str) -> dict:
    """The checked [model] table of a shape file; `shape` itself was checked against shapes() already."""
    path = SHAPE_DIR / f"{name}.toml"
    source = _show(path)
    data = _read(path)
    if set(data) - {"model"}:
        raise UserError(f"{source} may hold only a [model] table, found {', '.join(sorted(set(data) - {'model'}))}")
    _check(data, source)
    return data.get("model", {})


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{_show(path)} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {_show(path)}: {e.strerror}") from None


def _show(path: Path) -> str:
    """How errors name a file: built-ins as presets/..., others relative to the working directory when inside it."""
    for root in (PRESET_DIR.parent, Path.cwd()):
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: tables merge key by key; any other value in `top` replaces the one in `base`."""
    out = dict(base)
    for key, value in top.items():
        both_tables = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_tables else value
    return out


# --- checking --------------------------------------------------------------------------------------------------


def _check(table: dict, source: str, prefix: str = "") -> None:
    """Raise UserError for the first key in `table` the schema lacks, or whose value has the wrong type or choice."""
    for key, value in table.items():
        dotted = prefix + key
        kind = KEYS.get(dotted)
        if kind is None:
            raise unknown_key(dotted, KEYS, source)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"'{dotted}' in {source} must be a table ([{dotted}]), got {value!r}")
            _check(value, source, dotted + ".")
        elif not _is(value, kind):
            raise UserError(f"'{dotted}' in {source} must be {TYPE_NAMES[kind]}, got {value!r}")
        elif (choices := _choices(dotted)) and value not in choices:
            raise UserError(f"'{dotted}' in {source} must be one of {' | '.join(choices)}, got {value!r}")


def _is(value: object, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; only bool fields take it
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind == list[str]:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == list[float]:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if kind == list[int]:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, kind)


def _choices(dotted: str) -> tuple[str, ...] | list[str] | None:
    return shapes() if dotted == "shape" else CHOICES.get(dotted)


def _parse_overrides(overrides: Iterable[str]) -> dict:
    """`--set a.b=value` strings -> a nested table, each value typed from the schema field it sets."""
    tree: dict = {}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        kind = KEYS.get(key)
        if kind is None:
            raise unknown_key(key, KEYS, SET)
        if dataclasses.is_dataclass(kind):
            example = next(k for k in KEYS if k.startswith(key + "."))
            raise UserError(f"'{key}' in {SET} is a table; set one of its keys, e.g. {example}=...")
        try:
            if kind == list[str]:  # comma-separated: --set precision.bf16_modules=lm_head,mtp.*
                value = [item.strip() for item in text.split(",") if item.strip()]
            elif kind in (list[float], list[int]):
                value = [kind.__args__[0](item) for item in text.split(",") if item.strip()]
            else:
                value = BOOLS[text.strip().lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise UserError(f"'{key}' in {SET} must be {TYPE_NAMES[kind]}, got {text!r}") from None
        *tables, leaf = key.split(".")
        node = tree
        for table in tables:
            node = node.setdefault(table, {})
        node[leaf] = value
    _check(tree, SET)
    return tree


def _build(cls: type, data: dict, base=None):
    """`cls` from a checked table over `base` (default: cls's defaults), building nested dataclasses over the
    defaults of their field (a stage's [sft.train] starts from SFT's defaults, not pretraining's) and widening ints
    given for floats."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = _build(kind, value, getattr(base, key))
        elif kind is float:
            value = float(value)
        elif kind == list[float]:
            value = [float(v) for v in value]
        kwargs[key] = value
    return dataclasses.replace(base, **kwargs)


def _model_config(table: dict, source: str) -> ModelConfig:
    try:
        return _build(ModelConfig, table)
    except ValueError as e:  # ModelConfig.validate: fields that are fine alone but inconsistent together
        raise UserError(f"{source}: {e}") from None


def _check_plan(cfg: RunConfig) -> None:
    """Cross-field checks between the run plan and the model, named after the preset."""
    parallel, model = cfg.parallel, cfg.model
    for name in ("parallel", "sft", "sft.lora", "sft.train", "rlvr", "rlvr.train", "mopd", "mopd.train", "mtp_boost",
                 "mtp_boost.train", "extend", "extend.train"):
        _check_floors(cfg, name)
    if cfg.mopd.warmup.steps:  # 0 steps: no warmup, and the rest of its table is not used
        _check_floors(cfg, "mopd.warmup")
    check_train(cfg, "train")
    for key in ("reasoning_off", "reasoning_truncated", "val_fraction"):
        if getattr(cfg.sft, key) > 1:
            raise UserError(f"preset {cfg.name}: sft.{key} must be at most 1, got {getattr(cfg.sft, key)}")
    check_mtp_boost(cfg)
    check_extend(cfg)
    if cfg.rlvr.group_size < 2:
        raise UserError(f"preset {cfg.name}: rlvr.group_size must be at least 2 (GRPO compares the samples of a "
                        f"prompt with each other), got {cfg.rlvr.group_size}")
    if "E" in model.pattern and model.n_routed_experts % parallel.expert:
        raise UserError(
            f"preset {cfg.name}: parallel.expert ({parallel.expert}) must divide "
            f"model.n_routed_experts ({model.n_routed_experts})"
        )
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if parallel.world_size % model_parallel:
        raise UserError(
            f"preset {cfg.name}: the world ({parallel.world_size} devices) is not a multiple of "
            f"parallel.tensor x pipeline x context ({model_parallel})"
        )
    if parallel.data % parallel.expert:
        raise UserError(
            f"preset {cfg.name}: parallel.expert ({parallel.expert}) must divide the data-parallel degree "
            f"({parallel.data}): expert-parallel groups are carved out of the data-parallel ranks"
        )
    problem = model.context_parallel_problem(parallel.context)
    if problem:
        raise UserError(f"preset {cfg.name}: {problem}")
    if parallel.pipeline > model.num_layers:
        raise UserError(f"preset {cfg.name}: {parallel.pipeline} pipeline stages for {model.num_layers} sublayers")
    if "*" in model.pattern and model.num_key_value_heads % parallel.tensor and parallel.tensor % model.num_key_value_heads:
        raise UserError(
            f"preset {cfg.name}: parallel.tensor ({parallel.tensor}) and the {model.num_key_value_heads} kv heads "
            "must divide one another"
        )


def _table(cfg: RunConfig, name: str):
    table = cfg
    for part in name.split("."):
        table = getattr(table, part)
    return table


def _check_floors(cfg: RunConfig, name: str) -> None:
    table = _table(cfg, name)
    for f in dataclasses.fields(table):
        value = getattr(table, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        # Integers are sizes, degrees and counts (a zero would divide by zero), numbers are rates and scales;
        # a field may lower its own floor.
        least = f.metadata.get("min", 1 if isinstance(value, int) else 0)
        if value < least:
            raise UserError(f"preset {cfg.name}: {name}.{f.name} must be at least {least}, got {value}")


MTP_BOOST_DEPTHS = 7
"""The deepest draft the engine is tested at, so the most depths mtp-boost distills."""


def check_mtp_boost(cfg: RunConfig) -> None:
    """[mtp_boost]'s ranges (checked as a preset loads, and by the stage after its command-line options)."""
    mb = cfg.mtp_boost
    if not 1 <= mb.train.mtp_depths <= MTP_BOOST_DEPTHS:
        raise UserError(f"preset {cfg.name}: mtp_boost.train.mtp_depths (N, the depths distilled) must be 1 to "
                        f"{MTP_BOOST_DEPTHS}, got {mb.train.mtp_depths}")
    if not 0 < mb.temperature <= 10:
        raise UserError(f"preset {cfg.name}: mtp_boost.temperature (T) must be above 0 and at most 10, got "
                        f"{mb.temperature}")
    if not mb.init_pattern or set(mb.init_pattern) - set("*E"):
        raise UserError(f"preset {cfg.name}: mtp_boost.init_pattern {mb.init_pattern!r}: use attention (*) and MoE "
                        "(E) sublayers only; the engine drafts with no Mamba or dense MLP sublayer in the MTP block, "
                        "as vLLM")
    if mb.val_fraction >= 1:
        raise UserError(f"preset {cfg.name}: mtp_boost.val_fraction must be below 1, got {mb.val_fraction}")


EXTEND_SOURCES = ("repository", "retrieval", "corpus")
"""The built-in sources of `n3 extend`'s long rows (extend.data)."""


def check_extend(cfg: RunConfig) -> None:
    """[extend]'s own consistency (checked as a preset loads, and by the stage after its command-line options)."""
    ext, long = cfg.extend, cfg.extend.train.seq_len
    if not 0 <= ext.short_fraction < 1:
        raise UserError(f"preset {cfg.name}: extend.short_fraction must be at least 0 and below 1 (some iterations "
                        f"must be long), got {ext.short_fraction}")
    if ext.short_seq_len >= long or long % ext.short_seq_len:
        raise UserError(f"preset {cfg.name}: extend.short_seq_len ({ext.short_seq_len}) must be below extend.train."
                        f"seq_len ({long}) and divide it, so a short iteration holds the tokens of a long one")
    for source in ext.data:
        if "=" not in source and source not in EXTEND_SOURCES:
            close = difflib.get_close_matches(source, EXTEND_SOURCES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"preset {cfg.name}: extend.data: unknown source {source!r}{hint}; use "
                            f"{', '.join(EXTEND_SOURCES)} or NAME=PATH")
    if not ext.data:
        raise UserError(f"preset {cfg.name}: extend.data is empty; give at least one source of long rows")
    if ext.weights and (len(ext.weights) != len(ext.data) or min(ext.weights) < 0 or not sum(ext.weights)):
        raise UserError(f"preset {cfg.name}: extend.weights needs one non-negative weight per extend.data source "
                        f"({len(ext.data)}), not all zero; got {ext.weights}")
    if any(n > long for n in ext.ruler_lengths):
        raise UserError(f"preset {cfg.name}: extend.ruler_lengths {ext.ruler_lengths} go past extend.train.seq_len "
                        f"({long}), the context the phase trains")


def check_train(cfg: RunConfig, name: str, model: ModelConfig | None = None) -> None:
    """An optimisation table (`train`, pretraining's, checked as every preset loads; a stage's own such as
    `sft.train`, checked by the stage before it runs) against itself, the layout and the model (default: the
    preset's; a stage that starts from a checkpoint gives the checkpoint's)."""
    train, model = _table(cfg, name), model or cfg.model
    _check_floors(cfg, name)
    if not train.min_lr <= train.lr or train.lr == 0:
        raise UserError(f"preset {cfg.name}: need 0 <= {name}.min_lr <= {name}.lr and {name}.lr > 0")
    for key in ("decay_fraction", "adam_beta1", "adam_beta2"):
        if getattr(train, key) > 1:
            raise UserError(f"preset {cfg.name}: {name}.{key} must be at most 1, got {getattr(train, key)}")
    per_step = train.micro_batch_size * cfg.parallel.data
    if train.global_batch_size % per_step:
        raise UserError(
            f"preset {cfg.name}: {name}.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"{name}.micro_batch_size x data-parallel ranks ({train.micro_batch_size} x {cfg.parallel.data} = "
            f"{per_step})"
        )
    if train.seq_len > model.max_position_embeddings:
        raise UserError(
            f"preset {cfg.name}: {name}.seq_len ({train.seq_len}) exceeds the model's context "
            f"(max_position_embeddings {model.max_position_embeddings})"
        )
