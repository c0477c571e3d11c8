"""Low-precision training: a converter that swaps selected Linear modules (and routed experts) for quantized ones,
torchtitan style. The training runtime calls it once, after building the model and before wrapping it for
parallelism, when `precision.compute` is fp8 or nvfp4:

    from model.lowp import convert
    conversion = convert(model, cfg.precision)   # cfg.precision: presets.schema.PrecisionConfig
    print(conversion.summary())                  # what runs in which format, and on which backend

Parameters, state-dict keys and checkpoints do not change: a converted module keeps its master weight and quantizes
on the fly. Formats and GEMMs (REFERENCE.md section 3):

- nvfp4 (arXiv 2509.25149, TransformerEngine's NVFP4BlockScaling): forward y = x W^T with x in 1x16 blocks and W in
  16x16 blocks, round to nearest; dgrad dx = dy W with dy in 1x16 blocks along the output width and stochastic
  rounding, W reusing its 16x16 blocks (a tile is its own transpose's tile); wgrad dW = dy^T x with both operands
  put through the 16x16 random Hadamard transform along the tokens and quantized in 1x16 blocks there, dy with
  stochastic rounding. Emulated: quantize-dequantize, then a GEMM in fp32.
- mxfp8: E4M3 with E8M0 scales per 32 elements along each GEMM's reduction dimension. Emulated.
- fp8: per-tensor current scaling, E4M3 for x and W, E5M2 for gradients (TransformerEngine's hybrid format); real
  FP8 GEMMs through kernels.fp8.scaled_mm (torch._scaled_mm) on CUDA devices with FP8 tensor cores, else emulated.
Gradients are straight-through: dW above is the weight's gradient, as if quantization were the identity.

With TransformerEngine installed and the model on CUDA, Linear modules run TE's own kernels under the matching TE
recipe instead (routed experts stay on n3's path: TE's grouped GEMM needs one weight tensor per expert).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from kernels.backends import fast_path, importable
from kernels.fp8 import E5M2, fp8_quantize, mxfp8_fake_quantize, scaled_mm
from kernels.hadamard import random_hadamard_transform
from kernels.nvfp4 import nvfp4_fake_quantize
from model.moe import Experts

FORMATS = ("nvfp4", "mxfp8", "fp8")
LOW_PRECISION_COMPUTE = ("fp8", "nvfp4")


class PrecisionSettings(Protocol):
    """What convert reads; presets.schema.PrecisionConfig has these fields (documented there)."""

    compute: str
    bf16_modules: list[str]
    fp8_modules: list[str]
    bf16_last_layers: float


# --- quantized GEMMs ------------------------------------------------------------------------------------------------
def _nvfp4(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    return nvfp4_fake_quantize(x, (1, 16), stochastic=stochastic)


class _EmulatedLinear(torch.autograd.Function):
    """y = x W^T with NVFP4 or MXFP8 operands in all three GEMMs, emulated in fp32 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, fmt: str) -> torch.Tensor:
        x, w = x.float(), weight.float()
        if fmt == "nvfp4":
            wq = nvfp4_fake_quantize(w, (16, 16))
            y = _nvfp4(x) @ wq.T
        else:
            wq = None
            y = mxfp8_fake_quantize(x) @ mxfp8_fake_quantize(w).T
        ctx.fmt = fmt
        ctx.save_for_backward(x, w if wq is None else wq)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy = dy.float()
        if ctx.fmt == "nvfp4":
            dx = _nvfp4(dy, stochastic=True) @ w
            dw = _nvfp4(random_hadamard_transform(dy.T), stochastic=True) @ _nvfp4(random_hadamard_transform(x.T)).T
        else:
            dx = mxfp8_fake_quantize(dy) @ mxfp8_fake_quantize(w.T.contiguous()).T
            dw = mxfp8_fake_quantize(dy.T.contiguous()) @ mxfp8_fake_quantize(x.T.contiguous()).T
        return dx, dw, None


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with per-tensor FP8 operands: E4M3 activations and weights, E5M2 gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        (xq, sx), (wq, sw) = fp8_quantize(x), fp8_quantize(weight)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.out_dtype = out_dtype
        return scaled_mm(xq, wq.T, sx, sw, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        gq, sg = fp8_quantize(dy, dtype=E5M2)
        dx = scaled_mm(gq, wq, sg, sw, ctx.out_dtype)
        dw = scaled_mm(gq.T, xq, sg, sx, torch.float32)  # into the fp32 master gradient
        return dx, dw, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T with the GEMMs of `fmt` (nvfp4, mxfp8 or fp8); the output has x's dtype, or
    the autocast dtype under autocast (as nn.Linear would)."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(device, enabled=False):
        if fmt == "fp8":
            y = _FP8Linear.apply(flat, weight, out_dtype)
        elif fmt in ("nvfp4", "mxfp8"):
            y = _EmulatedLinear.apply(flat, weight, fmt)
        else:
            raise ValueError(f"unknown low-precision format {fmt!r}; formats are {', '.join(FORMATS)}")
    return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])


class QuantizedLinear(nn.Linear):
    """nn.Linear whose GEMMs run in `fmt`; same parameters, so the same state dict."""

    fmt: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantizedLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.fmt = fmt
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_linear(x, self.weight, self.fmt)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}"


class QuantizedExperts(Experts):
    """Routed experts whose per-expert GEMMs run in `fmt` (each expert quantized on its own, as its own tensor)."""

    fmt: str

    @classmethod
    def from_experts(cls, experts: Experts, fmt: str) -> QuantizedExperts:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.up_proj, new.down_proj = experts.up_proj, experts.down_proj
        new.parallel, new.fmt = experts.parallel, fmt
        return new

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        pieces = [
            quantized_linear(chunk, weight[e], self.fmt)
            for e, chunk in enumerate(rows.split(counts.tolist())) if chunk.shape[0]
        ]
        return torch.cat(pieces) if pieces else rows.new_zeros(0, weight.shape[1])

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}"


class TransformerEngineLinear(QuantizedLinear):
    """A QuantizedLinear computed by TransformerEngine's te.Linear on the same weight, inside TE's autocast for the
    recipe. The TE module is kept out of the module tree, so parameters and state dicts stay n3's."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> TransformerEngineLinear:
        import transformer_engine.pytorch as te

        new = super().from_linear(linear, fmt)
        engine = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           params_dtype=linear.weight.dtype, device=linear.weight.device)
        engine.weight = linear.weight
        if linear.bias is not None:
            engine.bias = linear.bias
        new.__dict__["engine"] = engine
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _te_autocast(self.fmt):
            return self.engine(x)


def _te_autocast(fmt: str):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    chosen = {"nvfp4": recipe.NVFP4BlockScaling, "mxfp8": recipe.MXFP8BlockScaling,
              "fp8": recipe.Float8CurrentScaling}[fmt]()
    if hasattr(te, "autocast"):  # TransformerEngine 2.8+
        return te.autocast(enabled=True, recipe=chosen)
    return te.fp8_autocast(enabled=True, fp8_recipe=chosen)


# --- which modules, in which format ---------------------------------------------------------------------------------
def plan(model: nn.Module, precision: PrecisionSettings) -> dict[str, str]:
    """Format of every Linear and routed-experts module by name: nvfp4, mxfp8, fp8 or bf16 (kept in the model's own
    precision). Empty unless precision.compute is fp8 or nvfp4. Works on the meta device."""
    if precision.compute not in LOW_PRECISION_COMPUTE:
        return {}
    layers = model.config.num_layers  # of the whole stack, also when `model` holds one pipeline stage's layers
    first_kept = layers - math.floor(precision.bf16_last_layers * layers + 1e-9)
    formats = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Experts)):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if _matches(name, precision.bf16_modules) or (layer and int(layer[1]) >= first_kept):
            formats[name] = "bf16"
        elif precision.compute == "nvfp4" and _matches(name, precision.fp8_modules):
            formats[name] = "mxfp8"
        else:
            formats[name] = precision.compute
    return formats


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass
class Conversion:
    formats: dict[str, str] = field(default_factory=dict)
    """Module name -> format, for every Linear and routed-experts module (bf16: left as it was)."""
    backend: str = "none"
    """transformer_engine, scaled_mm (real FP8 GEMMs via torch._scaled_mm), emulated, or none (nothing converted)."""
    note: str = ""
    """What the backend means for speed and numerics, in a sentence for the run log."""

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        listed = ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items())) or "nothing converted"
        return f"low precision ({self.backend}): {listed} modules. {self.note}".strip()


def convert(model: nn.Module, precision: PrecisionSettings, backend: str = "auto") -> Conversion:
    """Swap the modules plan() selects for quantized ones, in place; returns what was done.

    backend: "auto" (TransformerEngine when it imports and the model is on CUDA, else n3's own path), "emulated"
    (n3's own path), or "transformer_engine" (ValueError when it does not import).
    """
    formats = plan(model, precision)
    if not formats:
        return Conversion(note=f"compute {precision.compute}: no low-precision GEMMs")
    on_cuda = next(model.parameters()).is_cuda
    has_te = importable("transformer_engine.pytorch")
    if backend == "transformer_engine" and not has_te:
        raise ValueError("backend transformer_engine requested but transformer_engine does not import; "
                         "install the gpu extra (pip install 'n3[gpu]')")
    if backend not in ("auto", "emulated", "transformer_engine"):
        raise ValueError(f"backend must be auto, emulated or transformer_engine, got {backend!r}")
    use_te = backend == "transformer_engine" or (backend == "auto" and has_te and on_cuda)
    for name, fmt in formats.items():
        if fmt == "bf16":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if isinstance(module, Experts):
            replacement = QuantizedExperts.from_experts(module, fmt)
        elif use_te:
            replacement = TransformerEngineLinear.from_linear(module, fmt)
        else:
            replacement = QuantizedLinear.from_linear(module, fmt)
        setattr(parent, child, replacement)
    return Conversion(formats, *_backend_note(precision.compute, use_te, has_te, on_cuda))


def _backend_note(compute: str, use_te: bool, has_te: bool, on_cuda: bool) -> tuple[str, str]:
    if use_te:
        return "transformer_engine", "Linear GEMMs run in TransformerEngine; routed experts use n3's path."
    missing = "TransformerEngine is not installed (pip install 'n3[gpu]'); " if not has_te else ""
    if compute == "fp8" and fast_path("fp8_gemm", on_cuda) and torch.cuda.get_device_capability() >= (8, 9):
        return "scaled_mm", f"{missing}FP8 GEMMs run on torch._scaled_mm."
    return "emulated", (
        f"{missing}{compute} is emulated: quantize-dequantize then fp32 GEMMs, numerically the recipe's formats "
        "but slower than full precision."
    )
