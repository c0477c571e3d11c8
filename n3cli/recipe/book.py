"""A recipe file: the stages `n3 recipe` runs, each with its preset, `--set` overrides and command options.

    description = "..."
    preset = "cpu"                     # every stage's hardware preset unless its table names another
    cycles = 2                         # MOPD iterations: the second re-trains the teachers from the first's student
    [pretrain]
    set = ["train.steps=500"]          # --set overrides, checked as the preset loader checks them
    [extend]
    seq_len = 4096                     # any option of the command: `n3 extend --seq-len 4096`
    [rlvr]
    domains = ["math", "code"]         # one teacher per domain: `n3 rlvr --env math`, `n3 rlvr --env code`
    [rlvr.code]                        # one domain's teacher: its own --set lines, after the table's
    set = ["rlvr.prompts_per_step=32"]
    [eval.ruler]                       # eval: one table per `n3 eval` command to run
    lengths = "1k,2k,4k"

A stage runs when its table is there, in the pipeline's order (STAGES) whatever the file's. Every key is checked:
an unknown one is an error that names the closest valid one, and option values are parsed by the command itself,
so a recipe that loads is a recipe whose commands parse.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import typer

import presets
from presets.loader import PRESET_DIR
from model.errors import UserError, unknown_key

STAGES = ("data", "pretrain", "extend", "sft", "rlvr", "mopd", "mtp-boost", "quantize", "eval")
"""The pipeline, in order (REFERENCE.md section 4): each stage's output is the next one's input."""
EVALS = ("tasks", "ruler", "perplexity", "mtp")
"""The `n3 eval` commands a recipe's eval stage runs on the final checkpoint."""
BUILT_IN_DOMAINS = ("math", "code", "instructions")
RECIPE_DIR = PRESET_DIR / "recipes"
DEFAULT_RECIPE = "tiny"

TOP_KEYS = ("description", "preset", "cycles", *STAGES)
STAGE_KEYS = ("preset", "set")
RECIPE_KEYS = {"rlvr": ("domains",)}
"""Keys a stage's table takes besides its command's options: they shape the recipe, not one command."""
SET_BY_RECIPE = {"checkpoint", "out", "resume", "dry_run", "preset", "overrides"}
"""Options the recipe gives every command itself (the chaining of inputs and outputs); a table may not."""
SET_BY_RECIPE_PER_STAGE = {
    "data": {"sources"},
    "rlvr": {"env"},  # from domains
    "mopd": {"teacher", "env"},  # the cycle's teachers, one per domain
    "eval": {"endpoint", "tokenizer", "model", "data", "text"},
}


@dataclass
class StageSpec:
    """One stage of a recipe: its preset, overrides and command options (for eval: per eval command)."""

    name: str
    preset: str
    sets: list[str] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    domain_sets: dict[str, list[str]] = field(default_factory=dict)
    """rlvr: each domain's own --set lines, after the table's."""
    evals: dict[str, dict[str, object]] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    description: str
    preset: str
    cycles: int
    stages: dict[str, StageSpec]
    """The stages to run, by name, in the pipeline's order."""


def names() -> list[str]:
    """The built-in recipes (presets/recipes/*.toml)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def locate(name_or_path: str | Path) -> Path:
    """A built-in recipe's file, or the path given."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist")
        return path
    if (RECIPE_DIR / f"{path}.toml").is_file():
        return RECIPE_DIR / f"{path}.toml"
    raise UserError(f"no recipe {name_or_path!r}: give a .toml file or one of {', '.join(names())}")


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> Recipe:
    """Read and check a recipe file; any mistake in it raises UserError naming the key and the file."""
    path = locate(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    _check_keys(data, TOP_KEYS, path, "")
    preset = _typed(data.get("preset", presets.DEFAULT_PRESET), str, "preset", path)
    cycles = _typed(data.get("cycles", 1), int, "cycles", path)
    if cycles < 1:
        raise UserError(f"{path}: cycles must be at least 1, got {cycles}")
    stages = {}
    for name in STAGES:
        if name in data:
            table = _typed(data[name], dict, name, path)
            stages[name] = _stage(name, table, preset, path)
    if not stages:
        raise UserError(f"{path} lists no stage: give at least one table of {', '.join(STAGES)}")
    if "mopd" in stages and "rlvr" not in stages:
        raise UserError(f"{path}: [mopd] needs teachers, which [rlvr] trains (one per domain); add an [rlvr] table")
    return Recipe(path, _typed(data.get("description", ""), str, "description", path), preset, cycles, stages)


def _stage(name: str, table: dict, preset: str, path: Path) -> StageSpec:
    own = (*STAGE_KEYS, *RECIPE_KEYS.get(name, ()))
    spec = StageSpec(name, _typed(table.get("preset", preset), str, f"{name}.preset", path))
    spec.sets = [_typed(s, str, f"{name}.set", path) for s in _typed(table.get("set", []), list, f"{name}.set", path)]
    try:
        presets.load(spec.preset, spec.sets)
    except UserError as e:
        raise UserError(f"{path} [{name}]: {e}") from None
    if name == "eval":
        _check_keys(table, (*own, *EVALS), path, "eval.")
        for kind in EVALS:
            if kind in table:
                options = _typed(table[kind], dict, f"eval.{kind}", path)
                spec.evals[kind] = _options(("eval", kind), options, path, f"eval.{kind}.", "eval")
        if not spec.evals:
            spec.evals = {kind: {} for kind in EVALS}
        return spec
    if name == "rlvr":
        spec.domains = [_typed(d, str, "rlvr.domains", path) for d in
                        _typed(table.get("domains", list(BUILT_IN_DOMAINS)), list, "rlvr.domains", path)]
        if not spec.domains:
            raise UserError(f"{path}: rlvr.domains is empty: give the domains to train a teacher for")
        own = (*own, *spec.domains)
        for domain in spec.domains:
            if isinstance(table.get(domain), dict):
                sub = table[domain]
                _check_keys(sub, ("set",), path, f"rlvr.{domain}.")
                spec.domain_sets[domain] = [_typed(x, str, f"rlvr.{domain}.set", path)
                                            for x in _typed(sub.get("set", []), list, f"rlvr.{domain}.set", path)]
                try:
                    presets.load(spec.preset, [*spec.sets, *spec.domain_sets[domain]])
                except UserError as e:
                    raise UserError(f"{path} [rlvr.{domain}]: {e}") from None
    options = {k: v for k, v in table.items() if k not in own}
    spec.options = _options((name,), options, path, f"{name}.", name)
    return spec


def _options(command: tuple[str, ...], options: dict, path: Path, prefix: str, stage: str) -> dict:
    """Check a table's options against the command's own: the names, then the values, parsed as the command
    line would parse them."""
    click_command = command_of(command)
    reserved = SET_BY_RECIPE | SET_BY_RECIPE_PER_STAGE.get(stage, set())
    valid = sorted(p.name for p in click_command.params if p.name not in reserved and p.opts)
    for key in options:
        if key in reserved:
            raise UserError(f"{path}: {prefix}{key} is set by the recipe itself (it chains each stage's output "
                            "into the next); remove it")
        if key.replace("-", "_") not in valid:
            raise unknown_key(f"{prefix}{key}", [f"{prefix}{v}" for v in valid], str(path))
    options = {k.replace("-", "_"): v for k, v in options.items()}
    argv = option_argv(click_command, options)
    try:
        click_command.make_context(" ".join(("n3", *command)), argv)
    except Exception as e:  # the command's own parse error: a value of the wrong type or out of range
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise UserError(f"{path} [{prefix.rstrip('.')}]: {' '.join(message.split())}") from None
    return options


def command_of(command: tuple[str, ...]):
    """The parsed-command object (click) of `n3 <command...>`: its options, names and types."""
    from n3cli.main import app

    found = typer.main.get_command(app)
    for part in command:
        found = found.commands[part]
    return found


def option_argv(click_command, options: dict[str, object]) -> list[str]:
    """Command-line flags for {option name: value}: a bool is its flag (or its --no- form), a list repeats."""
    params = {p.name: p for p in click_command.params}
    argv: list[str] = []
    for key, value in options.items():
        param = params[key]
        flag = param.opts[0]
        if isinstance(value, bool) and getattr(param, "is_flag", False):
            if value:
                argv.append(flag)
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return argv


def _check_keys(table: dict, valid: tuple[str, ...], path: Path, prefix: str) -> None:
    for key in table:
        if key not in valid:
            raise unknown_key(f"{prefix}{key}", [f"{prefix}{v}" for v in valid], str(path))


def _typed(value, kind: type, key: str, path: Path):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{path}: {key} must be {'a table' if kind is dict else 'a ' + kind.__name__}, "
                        f"got {value!r}")
    return value
