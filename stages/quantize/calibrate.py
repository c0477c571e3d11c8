"""What n3 quantize takes from nvidia-modelopt: quantizer modules, max calibration and the AutoQuantize search.

modelopt's own NVFP4 fake quantization needs CUDA (its dynamic block quantizer asserts a CUDA amax, its kernels are
Triton/CUDA); its FP8 fake quantization, calibration, AutoQuantize (gradient sensitivity scores and the PuLP/CBC
integer program) and NVFP4QTensor run on the CPU. So n3 registers two things with it:

- `n3_nvfp4`, a quantizer backend: NVFP4 fake quantization (1x16 blocks, Four-Over-Six when the format asks) with n3's
  byte-exact kernels and a straight-through gradient, used for every NVFP4 quantizer in the formats below;
- a quantized module for n3's routed experts (stacked weights, one GEMM hook), built on modelopt's wrapper for
  NemotronH's non-gated fused experts: one input quantizer per projection shared by all experts, one weight quantizer
  per expert, one search decision per layer.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from kernels import grouped_mm
from kernels.nvfp4 import nvfp4_fake_quantize
from model.errors import UserError
from model.hybrid import NemotronH
from model.moe import Experts
from stages.quantize.plan import QuantPlan

BACKEND = "n3_nvfp4"
MTP_DEPTHS = 2
MTP_WEIGHT = 0.3 / MTP_DEPTHS
"""Scores include the MTP loss as training weighs it, so the search sees what the MTP head's weights are worth."""


def _mtq():
    try:
        mtq = _quiet(importlib.import_module, "modelopt.torch.quantization")
        importlib.import_module("modelopt.torch.quantization.plugins.huggingface")  # its fused-experts support
    except ImportError as err:
        raise UserError(f"n3 quantize needs nvidia-modelopt and transformers ({err}); "
                        "install them with pip install 'n3[quantize]'") from None
    _register()
    return mtq


@cache
def _register() -> None:
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend
    from modelopt.torch.quantization.plugins.huggingface import _QuantNonGatedFusedExperts

    class QuantExperts(_QuantNonGatedFusedExperts):
        """n3's Experts under modelopt: quantizers applied in the expert GEMM hook instead of F.linear."""

        @property
        def functionals_to_replace(self) -> Iterator:
            return iter(())

        def matmul(self, rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            proj = "up_proj" if weight is self.up_proj else "down_proj"
            rows = getattr(self, f"{proj}_input_quantizer")(rows)
            per_expert = getattr(self, f"{proj}_weight_quantizers")
            return grouped_mm(rows, torch.stack([q(w) for q, w in zip(per_expert, weight)]), counts)

    register_quant_backend(BACKEND, _nvfp4_backend)
    if QuantModuleRegistry.get(Experts) is None:
        QuantModuleRegistry.register({Experts: "n3.Experts"})(QuantExperts)


def _nvfp4_backend(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """modelopt quantizer backend: NVFP4 fake quantization along the last dimension by n3's kernels; the calibrated
    amax (activations) sets the global scale when there is one."""
    amax = quantizer.amax
    amax = amax.float().reshape(()) if amax is not None and amax.numel() == 1 else None
    four_over_six = (quantizer.backend_extra_args or {}).get("four_over_six")
    flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    quantized = nvfp4_fake_quantize(flat, amax=amax, four_over_six=four_over_six).reshape(inputs.shape)
    return inputs + (quantized.to(inputs.dtype) - inputs).detach()


def nvfp4_format(four_over_six: str | None = None) -> dict:
    weight = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
              "backend": BACKEND, "effective_bits": 4.5}
    activation = dict(weight)
    if four_over_six:
        weight["backend_extra_args"] = {"four_over_six": four_over_six}
    return _format(weight, activation)


def fp8_format() -> dict:
    per_tensor = {"num_bits": (4, 3), "axis": None}
    return _format(per_tensor, per_tensor)


def _format(weight: dict, activation: dict) -> dict:
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": weight},
            {"quantizer_name": "*input_quantizer", "cfg": activation},
        ],
        "algorithm": "max",
    }


def _quiet(call: Callable, *args, **kwargs):
    """modelopt (and torchao, which it imports) print progress bars, solver logs and version warnings; n3 shows its
    own progress."""
    pytree = logging.getLogger("torch.utils._pytree")  # torchao's import logs deprecations through it
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(*args, **kwargs)
    finally:
        pytree.setLevel(level)


def forward_step(model: nn.Module, batch: torch.Tensor):
    """Logits of the main model and of each MTP depth for batch (b, t+1) (inputs are the first t tokens)."""
    inputs = batch[:, :-1]
    hidden = model.model(inputs)
    depths = model.mtp_hidden(hidden, inputs, MTP_DEPTHS) if model.mtp is not None else []
    return [model.logits(hidden), *(model.logits(h) for h in depths)]


def loss(outputs: list[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy plus the MTP losses; depth k predicts k tokens further (its last k positions masked)."""
    labels = batch[:, 1:]
    total = 0.0
    for k, logits in enumerate(outputs):
        weight = 1.0 if k == 0 else MTP_WEIGHT
        predicted = logits[:, : logits.shape[1] - k]
        total = total + weight * F.cross_entropy(predicted.flatten(0, 1), labels[:, k:].flatten())
    return total


def search(model: NemotronH, plan: QuantPlan, budget: float, four_over_six: str | None,
           batches: list[torch.Tensor]) -> tuple[dict[str, str], nn.Module]:
    """AutoQuantize: per-layer NVFP4 / FP8 / BF16 ranked by gradient sensitivity on `batches`, within `budget` BPE.

    modelopt calibrates every candidate format and scores it (its Taylor / Fisher estimate of the loss change);
    the choice is then made by modelopt's integer-program solver (LPS) under n3's constraint, stored bits over all
    parameters. modelopt's own "effective bits" differ from that (they cover only the searched weights, and
    modelopt 0.47 counts only down_proj of non-gated fused experts such as NemotronH's), so its own pick is replaced.
    Returns the formats per unit and the calibrated quantized copy of the model, set to them.
    """
    mtq = _mtq()
    from modelopt.torch.opt.searcher import LPS
    from modelopt.torch.opt.utils import get_hparam

    only_fp8 = [{"module_name_patterns": [u.name], "quantization_formats": [fp8_format()]}
                for u in plan.units if not u.nvfp4]
    experts = [{"module_name_patterns": [u.name], "quantization_formats": [nvfp4_format(four_over_six), fp8_format()]}
               for u in plan.units if u.experts and u.nvfp4]
    quantized, state = _quiet(
        mtq.auto_quantize, copy.deepcopy(model), constraints={"effective_bits": 16.0},
        quantization_formats=[nvfp4_format(), fp8_format()], data_loader=batches, forward_step=forward_step,
        loss_func=loss, num_calib_steps=len(batches), num_score_steps=len(batches), disabled_layers=["*conv1d*"],
        module_search_spaces=(only_fp8 + experts) or None,
    )
    units = {u.name: u for u in plan.units}
    decisions = {name: stats for name, stats in state["candidate_stats"].items()
                 if any(m in units for m in stats["module_names"])}
    costs = [
        [sum(plan.unit_bits(units[m], _format_of(recipe)) for m in stats["module_names"] if m in units)
         for recipe in stats["formats"]]
        for stats in decisions.values()
    ]
    scores = [stats["scores"] for stats in decisions.values()]
    decided = {m for stats in decisions.values() for m in stats["module_names"]}
    fixed = sum(bits for _, bits in plan.fixed.values()) + sum(
        plan.unit_bits(u, "bf16") for u in plan.units if u.name not in decided)
    solver = _quiet(LPS, "n3_bits_per_element", {"bits": budget * plan.total_params - fixed}, {"bits": costs}, scores)
    selections, status = _quiet(solver)
    if status != "Optimal":
        raise UserError(f"no per-layer choice of formats meets --bpe {budget} (solver: {status})")
    for (name, stats), chosen in zip(decisions.items(), selections):
        get_hparam(quantized, name).active = stats["formats"][chosen]
    return formats_of(quantized, plan), quantized


def _format_of(recipe) -> str:
    """A modelopt QuantRecipe's format by its compression (stored bits / 16)."""
    return {4.5: "nvfp4", 8.0: "fp8", 16.0: "bf16"}[recipe.compression * 16]


def calibrate(model: NemotronH, plan: QuantPlan, four_over_six: str | None, batches: list[torch.Tensor]) -> nn.Module:
    """A quantized copy of the model in the plan's formats, its activation ranges calibrated (max) on `batches`."""
    mtq = _mtq()
    entries = [{"quantizer_name": "*", "enable": False}]
    for unit in plan.units:
        fmt = plan.formats[unit.name]
        if fmt == "bf16":
            continue
        spec = nvfp4_format(four_over_six if unit.experts else None) if fmt == "nvfp4" else fp8_format()
        for entry in spec["quant_cfg"][1:]:
            entries.append({**entry, "quantizer_name": f"{unit.name}.{entry['quantizer_name']}"})

    def forward_loop(quantized: nn.Module) -> None:
        for batch in batches:
            forward_step(quantized, batch)

    with torch.no_grad():
        return _quiet(mtq.quantize, copy.deepcopy(model), {"quant_cfg": entries, "algorithm": "max"}, forward_loop)


def formats_of(quantized: nn.Module, plan: QuantPlan) -> dict[str, str]:
    """The format each unit's weight quantizer holds in a modelopt-quantized copy."""
    formats = {}
    for unit in plan.units:
        module = quantized.get_submodule(unit.name)
        experts = hasattr(module, "up_proj_weight_quantizers")
        quantizer = module.up_proj_weight_quantizers[0] if experts else module.weight_quantizer
        bits = tuple(quantizer.num_bits) if isinstance(quantizer.num_bits, (tuple, list)) else quantizer.num_bits
        formats[unit.name] = "bf16" if not quantizer.is_enabled else {(2, 1): "nvfp4", (4, 3): "fp8"}[bits]
    return formats


def input_amax(quantized: nn.Module, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """Calibrated activation amax per quantized weight, by n3 weight name (experts: `<unit>.up_proj`, `.down_proj`)."""
    amax = {}
    for unit in plan.units:
        if plan.formats[unit.name] == "bf16":
            continue
        module = quantized.get_submodule(unit.name)
        if hasattr(module, "up_proj_input_quantizer"):
            found = {f"{unit.name}.{p}": getattr(module, f"{p}_input_quantizer").amax for p in ("up_proj", "down_proj")}
        else:
            found = {f"{unit.name}.weight": module.input_quantizer.amax}
        for name, value in found.items():
            if value is None:
                raise UserError(f"calibration never reached {unit.name}; give more calibration tokens (--calib-tokens)")
            amax[name] = value.detach().float().reshape(())
    return amax
