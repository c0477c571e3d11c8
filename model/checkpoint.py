"""Hugging Face NemotronH checkpoints: read both namings, write the released hub form.

- transformers 5: `model.*` keys, routed experts stacked (`experts.up_proj` (E, m, l)), `layers_block_type` lists.
- released hub form: `backbone.*` keys, one tensor per expert (`experts.{e}.up_proj.weight`), `hybrid_override_pattern`,
  MTP weights under `mtp.*`.
n3's module names are the transformers-5 keys, so reading the hub form is a rename plus stacking, and writing it is
the reverse. Sharded checkpoints (`model.safetensors.index.json`) and single files are both read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.errors import UserError
from model.hybrid import NemotronH, cast

BLOCK_NAMES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E", "mlp": "-"}
HUB_BLOCK_NAMES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# n3 field -> HF config key, then older aliases the released configs may carry.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "mamba_num_heads": ("mamba_num_heads",),
    "mamba_head_dim": ("mamba_head_dim",),
    "mamba_groups": ("n_groups", "mamba_n_groups"),
    "ssm_state_size": ("ssm_state_size",),
    "conv_kernel": ("conv_kernel", "mamba_d_conv"),
    "chunk_size": ("chunk_size", "mamba_chunk_size"),
    "use_conv_bias": ("use_conv_bias", "mamba_conv_bias"),
    "time_step_min": ("time_step_min", "mamba_dt_min"),
    "time_step_max": ("time_step_max", "mamba_dt_max"),
    "time_step_floor": ("time_step_floor", "mamba_dt_init_floor"),
    "n_routed_experts": ("n_routed_experts",),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "moe_shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size",),
    "moe_latent_size": ("moe_latent_size",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    "norm_topk_prob": ("norm_topk_prob",),
    "intermediate_size": ("intermediate_size",),
    "norm_eps": ("layer_norm_epsilon",),
    "initializer_range": ("initializer_range",),
    "rescale_prenorm_residual": ("rescale_prenorm_residual",),
    "max_position_embeddings": ("max_position_embeddings",),
}


# --- config ---------------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of an HF NemotronH config.json (either naming)."""
    if hf.get("model_type", "nemotron_h") != "nemotron_h":
        raise UserError(f"config.json is a {hf['model_type']!r} model; n3 reads nemotron_h checkpoints")
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
        raise UserError("config.json uses group-limited routing (n_group > 1), which NemotronH models do not use")
    values = {}
    for field, keys in CONFIG_KEYS.items():
        for key in keys:
            if hf.get(key) is not None:
                values[field] = hf[key]
                break
    values.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    # HF clamps dt at time_step_min in its scan; a checkpoint written by n3 says which floor it was trained with.
    values["dt_floor"] = hf.get("dt_floor", values.get("time_step_min", ModelConfig.time_step_min))
    values["pattern"] = _pattern(hf.get("layers_block_type"), hf.get("hybrid_override_pattern"), "layers_block_type")
    mtp_sets = hf.get("num_nextn_predict_layers") or 0
    if mtp_sets > 1:
        raise UserError(f"num_nextn_predict_layers = {mtp_sets}: n3 supports one MTP weight set, applied recursively")
    if mtp_sets:
        mtp = _pattern(hf.get("mtp_layers_block_type"), hf.get("mtp_hybrid_override_pattern"), "mtp_layers_block_type")
        values["pattern"] += "/" + (mtp or "*E")
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"config.json does not describe a valid NemotronH model: {err}") from None


def _pattern(block_types: list[str] | None, pattern: str | None, key: str) -> str:
    if block_types is not None:
        unknown = sorted(set(block_types) - set(BLOCK_NAMES))
        if unknown:
            raise UserError(f"config.json {key} has unknown block types {unknown}")
        return "".join(BLOCK_NAMES[b] for b in block_types)
    return pattern or ""


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The released hub form of config.json, which transformers and vLLM load."""
    hf = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
    hf.update({keys[0]: getattr(cfg, field) for field, keys in CONFIG_KEYS.items()})
    hf.update(
        hybrid_override_pattern=cfg.main_pattern,
        num_hidden_layers=cfg.num_layers,
        moe_latent_size=cfg.moe_latent_size or None,
        num_nextn_predict_layers=1 if cfg.mtp_pattern else 0,
        dt_floor=cfg.dt_floor,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        mlp_hidden_act="relu2",
        mamba_hidden_act="silu",
        use_bias=False,
        mlp_bias=False,
        attention_bias=False,
        tie_word_embeddings=False,
        expand=max(1, cfg.mamba_inner // cfg.hidden_size),  # unused by NemotronH: inner = heads * head_dim
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.mtp_pattern:
        hf["mtp_hybrid_override_pattern"] = cfg.mtp_pattern
    return hf


# --- reading --------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest checkpoint of a run folder.

    A run folder (what `n3 pretrain` and the other training stages write) holds `checkpoints/step-<8 digits>/`, each
    a complete HF checkpoint (config.json, safetensors, tokenizer files) plus the stage's resumable state.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    complete = run_checkpoints(path)
    if complete:
        return complete[-1]
    if not path.exists():
        raise UserError(f"{path} does not exist")
    raise UserError(f"{path} is neither a checkpoint (no config.json) nor a run folder with checkpoints/step-*")


def run_checkpoints(run: str | Path) -> list[Path]:
    """A run folder's complete checkpoints (checkpoints/step-*/ holding a config.json), oldest first."""
    return sorted(step for step in (Path(run) / "checkpoints").glob("step-*") if (step / "config.json").is_file())


def newest_run(root: str | Path = "runs") -> Path | None:
    """The run folder under `root` whose newest complete checkpoint was written last, or None if there is none."""
    checkpoints = [step for step in Path(root).glob("*/checkpoints/step-*") if (step / "config.json").is_file()]
    if not checkpoints:
        return None
    return max(checkpoints, key=lambda step: (step / "config.json").stat().st_mtime).parent.parent


def stored_dtype(hf: dict) -> torch.dtype | None:
    """The dtype a config.json records (`torch_dtype`, or transformers 5's `dtype`); None when it names none."""
    return DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"))


def read_config(path: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory, with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory under its stored name, sharded or not."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is malformed ({err})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise UserError(f"{file} is listed in the index but missing")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise UserError(f"cannot read {file}: {err} (corrupt or truncated checkpoint?)") from None
    return tensors


_HUB_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def to_n3_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename hub keys to n3 (= transformers 5) keys and stack per-expert tensors; transformers-5 keys pass through."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("backbone."):
            key = "model." + key.removeprefix("backbone.")
        match = _HUB_EXPERT.match(key)
        if match:
            experts.setdefault((match[1], match[3]), {})[int(match[2])] = value
        else:
            out[key] = value
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise UserError(f"{prefix}: expert tensors are not numbered 0..{len(per_expert) - 1}")
        out[f"{prefix}.{proj}"] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> NemotronH:
    """Load an HF NemotronH checkpoint directory (either naming, sharded or not) as an n3 model.

    dtype defaults to the checkpoint's own; routers stay fp32 either way. A modelopt-format quantized checkpoint
    (config.json has a quantization_config) loads with its weights decoded: see dequantize_modelopt.
    """
    hf = read_config(path)
    cfg = config_from_hf(hf)
    tensors = read_tensors(path)
    if hf.get("quantization_config"):
        tensors = dequantize_modelopt(tensors, hf["quantization_config"])
    tensors = to_n3_names(tensors)
    if not cfg.mtp_pattern:  # transformers ignores MTP weights of a model configured without MTP; so do we
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    if dtype is None:
        dtype = stored_dtype(hf) or tensors["lm_head.weight"].dtype
    with torch.device("meta"):
        model = NemotronH(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not match its config: "
            + (f"missing {_few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_few(unexpected)}" if unexpected else "")
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)}; the config needs {tuple(expected[key].shape)}"
            )
        tensors[key] = value.to(device)
    model.load_state_dict(tensors, assign=True)
    return cast(model, dtype)


MODELOPT_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8")


def dequantize_modelopt(tensors: dict[str, torch.Tensor], quant_config: dict) -> dict[str, torch.Tensor]:
    """Weights of a modelopt-format checkpoint (what `n3 quantize` writes, and NVIDIA's NVFP4/FP8 releases) decoded
    to fp32, their scales dropped: the W4A16 path, exact to what the stored codes mean.

    NVFP4: `weight` uint8 (two E2M1 codes per byte), `weight_scale` E4M3 per 16 inputs, `weight_scale_2` fp32;
    FP8: `weight` E4M3, `weight_scale` fp32. `input_scale` (activation quantization) has no use at W4A16.
    """
    from kernels.nvfp4 import NVFP4Tensor  # here: plain checkpoints never need it

    if quant_config.get("quant_method") != "modelopt":
        raise UserError(f"quantization_config quant_method {quant_config.get('quant_method')!r}: "
                        "n3 reads modelopt-format (NVFP4, FP8) checkpoints")
    layers = quant_config.get("quantized_layers") or {}
    algos = {layer.get("quant_algo") for layer in layers.values()} or {quant_config.get("quant_algo")}
    if unsupported := sorted(str(a) for a in algos - {None, *MODELOPT_ALGOS}):
        raise UserError(f"quantization_config uses {', '.join(unsupported)}; n3 reads {', '.join(MODELOPT_ALGOS)}")
    out = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("weight_scale", "weight_scale_2", "input_scale"):
            continue
        if leaf == "weight" and f"{prefix}.weight_scale" in tensors:
            scale = tensors[f"{prefix}.weight_scale"]
            if f"{prefix}.weight_scale_2" in tensors:
                value = NVFP4Tensor(value, scale, tensors[f"{prefix}.weight_scale_2"].float(), (1, 16)).dequantize()
            else:
                value = value.float() * scale.float()
        out[key] = value
    return out


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


# --- writing --------------------------------------------------------------------------------------------------------
def to_hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """n3 keys -> released hub keys: `backbone.*` and one tensor per routed expert."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model."):
            key = "backbone." + key.removeprefix("model.")
        if key.endswith((".experts.up_proj", ".experts.down_proj")):
            prefix, proj = key.rsplit(".", 1)
            for e, tensor in enumerate(value.unbind(0)):
                out[f"{prefix}.{e}.{proj}.weight"] = tensor
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_pretrained(
    model: NemotronH, directory: str | Path, max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None
) -> None:
    """Write config.json, safetensors shards and their index into an existing directory (see save_pretrained)."""
    directory = Path(directory)
    write_tensors(to_hub_names(model.state_dict()), directory, max_shard_bytes)
    config = config_to_hf(model.config, model.lm_head.weight.dtype) | (extra_config or {})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Safetensors shards of at most max_shard_bytes each and their index, under the names given."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_pretrained(
    model: NemotronH, path: str | Path, max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None
) -> None:
    """Write the model as a released-form HF checkpoint directory, atomically (never half-written)."""
    with atomic_directory(path) as tmp:
        write_pretrained(model, tmp, max_shard_bytes, extra_config)
