"""Write a quantized checkpoint in modelopt's Hugging Face format, under the released hub names, which vLLM and
TensorRT-LLM load (REFERENCE.md section 3):

- NVFP4: `weight` uint8 (out, in / 2), `weight_scale` E4M3 (out, in / 16), `weight_scale_2` fp32 (= w_amax / 2688;
  / 1536 under Four-Over-Six), `input_scale` fp32 (= calibrated input amax / 2688);
- FP8: `weight` E4M3, `weight_scale` fp32 (= w_amax / 448), `input_scale` fp32 (= input amax / 448);
- everything else BF16, the router's expert bias fp32;
- `hf_quant_config.json` ({"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": ...}} when formats
  mix) and config.json's `quantization_config` (quant_method "modelopt"), both built by modelopt's own functions.
Codes and scales come from n3's kernels, byte-identical to modelopt's NVFP4QTensor for max-scaled weights. Each
routed expert is its own weight with its own global scale; the experts of a layer share the input scale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kernels.fp8 import fp8_quantize
from kernels.nvfp4 import E2M1_MAX, E4M3_MAX, nvfp4_quantize
from model.checkpoint import atomic_directory, config_to_hf, to_hub_names, write_tensors
from model.hybrid import NemotronH
from stages.quantize.plan import FP32_KEEP, QuantPlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hub_name(name: str) -> str:
    """n3 module name -> hub module name."""
    return "backbone." + name.removeprefix("model.") if name.startswith("model.") else name


def quantized_tensors(
    model: NemotronH, plan: QuantPlan, input_amax: dict[str, torch.Tensor], four_over_six: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """The checkpoint's tensors under hub names, and the format of every GEMM module by hub name (None: BF16)."""
    state = model.state_dict()
    tensors = {
        key: value.detach().float() if key.endswith(FP32_KEEP) else value.detach().to(torch.bfloat16)
        for key, value in to_hub_names(state).items()
    }
    layers: dict[str, str | None] = {}
    for unit in plan.units:
        fmt = plan.formats[unit.name]
        if unit.experts:
            experts = state[f"{unit.name}.up_proj"].shape[0]
            weights = [(f"{hub_name(unit.name)}.{e}.{p}", state[f"{unit.name}.{p}"][e], f"{unit.name}.{p}")
                       for p in ("up_proj", "down_proj") for e in range(experts)]
            rule = four_over_six
        else:
            weights = [(hub_name(unit.name), state[f"{unit.name}.weight"], f"{unit.name}.weight")]
            rule = None
        for prefix, weight, amax_key in weights:
            layers[prefix] = None if fmt == "bf16" else fmt
            if fmt != "bf16":
                tensors.update(quantize_weight(prefix, weight, input_amax[amax_key], fmt, rule))
    for key in state:  # routers are GEMMs too; modelopt lists them as unquantized
        if key.endswith(".gate.weight"):
            layers[hub_name(key.removesuffix(".weight"))] = None
    return tensors, layers


def quantize_weight(prefix: str, weight: torch.Tensor, input_amax: torch.Tensor, fmt: str,
                    four_over_six: str | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized Linear weight (out, in); four_over_six applies to NVFP4 only."""
    weight = weight.detach().float()
    if fmt == "nvfp4":
        q = nvfp4_quantize(weight, four_over_six=four_over_six)
        return {
            f"{prefix}.weight": q.packed,
            f"{prefix}.weight_scale": q.block_scale,
            f"{prefix}.weight_scale_2": q.global_scale.reshape(()),
            f"{prefix}.input_scale": (input_amax.float() / (E2M1_MAX * E4M3_MAX)).reshape(()),
        }
    data, scale = fp8_quantize(weight)
    return {
        f"{prefix}.weight": data,
        f"{prefix}.weight_scale": scale.reshape(()),
        f"{prefix}.input_scale": (input_amax.float() / E4M3_MAX).reshape(()),
    }


def quant_config(layers: dict[str, str | None]) -> dict:
    """hf_quant_config.json's content, by modelopt's process_layer_quant_config: one quant_algo with the unquantized
    modules in exclude_modules, or MIXED_PRECISION with every quantized module in quantized_layers."""
    import modelopt
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    per_layer = {}
    for prefix, fmt in layers.items():
        per_layer[f"{prefix}.quantization"] = fmt
        per_layer[f"{prefix}.awq_block_size"] = 16 if fmt == "nvfp4" else 0
    quantization = {"quant_algo": None, "kv_cache_quant_algo": None} | process_layer_quant_config(per_layer)
    return {"producer": {"name": "modelopt", "version": modelopt.__version__}, "quantization": quantization}


def write_checkpoint(
    out: Path, model: NemotronH, plan: QuantPlan, input_amax: dict[str, torch.Tensor], four_over_six: str | None,
    source: Path, report: dict,
) -> None:
    """The quantized checkpoint directory, atomically: weights, configs, the tokenizer files of `source`, and
    `quantization_report.json`."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    tensors, layers = quantized_tensors(model, plan, input_amax, four_over_six)
    hf_quant = quant_config(layers)
    with atomic_directory(out) as tmp:
        write_tensors(tensors, tmp)
        config = config_to_hf(model.config, torch.bfloat16)
        config["quantization_config"] = convert_hf_quant_config_format(hf_quant)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
        (tmp / "quantization_report.json").write_text(json.dumps(report, indent=2))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
