"""FP8: E4M3 / E5M2 elements, E8M0 power-of-two scales, per-tensor FP8, MXFP8, and the FP8 GEMM.

- Per-tensor FP8 (Hopper recipe, modelopt's FP8 export): scale = amax / 448, data = e4m3(x / scale).
  Gradients use E5M2 (max 57344) with the same rule, as TransformerEngine's hybrid format does.
- MXFP8 (OCP microscaling): E4M3 elements with one E8M0 scale per 32 consecutive elements. The scale exponent is
  ceil(log2(amax / 448)) by default, as Blackwell's hardware conversion, TransformerEngine and modelopt's MXFP8 export
  compute it (never saturates); "floor" is the OCP specification's floor(log2(amax)) - 8, which torchao uses by default
  (the block max may saturate at 448).
- `scaled_mm`: (a * scale_a) @ (b * scale_b) from FP8 operands, with `torch._scaled_mm` on CUDA devices that have FP8
  tensor cores (compute capability 8.9+) and an fp32 emulation everywhere else.
Casts to FP8 saturate (clamp first): a finite value never becomes NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}
E8M0_BIAS = 127
MX_BLOCK = 32


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """Values -> E4M3 bytes (uint8), round to nearest even, saturating at +-448."""
    return to_fp8(x, E4M3).view(torch.uint8)


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes (uint8) -> fp32."""
    return codes.view(E4M3).float()


def to_fp8(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Saturating cast to an FP8 dtype."""
    return x.float().clamp(-MAX[dtype], MAX[dtype]).to(dtype)


def e8m0_encode(scale: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Positive scales -> E8M0 bytes (uint8, 2^(byte - 127)), rounding the exponent up ("ceil", as modelopt computes
    it: ceil of the fp32 log2) or down ("floor", exact: from the binary exponent); zero maps to byte 0."""
    scale = scale.float()
    if rounding == "ceil":
        exponent = torch.ceil(torch.log2(scale))
    elif rounding == "floor":
        exponent = (torch.frexp(scale).exponent - 1).float()  # scale = m * 2^e with m in [0.5, 1)
    else:
        raise ValueError(f"rounding must be 'ceil' or 'floor', got {rounding!r}")
    exponent = torch.where(scale > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    return (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> fp32 powers of two; 255 is NaN."""
    value = torch.exp2(codes.float() - E8M0_BIAS)
    return torch.where(codes == 255, torch.full_like(value, float("nan")), value)


# --- per-tensor FP8 ---------------------------------------------------------------------------------------------------
def fp8_scale(amax: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Per-tensor scale amax / fp8_max (fp32); 1.0 for an all-zero tensor."""
    scale = amax.float() / MAX[dtype]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_quantize(
    x: torch.Tensor, amax: torch.Tensor | None = None, dtype: torch.dtype = E4M3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: (data in dtype, fp32 scale) with x ~ data * scale. amax defaults to x's own."""
    scale = fp8_scale(x.abs().amax() if amax is None else amax, dtype)
    return to_fp8(x.float() / scale, dtype), scale


def fp8_fake_quantize(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    data, scale = fp8_quantize(x, dtype=dtype)
    return (data.float() * scale).to(x.dtype)


# --- MXFP8 ------------------------------------------------------------------------------------------------------------
def mxfp8_quantize(x: torch.Tensor, rounding: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) with cols a multiple of 32 -> (E4M3 data (rows, cols), E8M0 scale bytes (rows, cols / 32))."""
    rows, cols = x.shape
    if cols % MX_BLOCK:
        raise ValueError(f"MXFP8 needs the last dimension to be a multiple of {MX_BLOCK}, got {cols}")
    blocks = x.float().reshape(rows, cols // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(-1)
    # ceil: the smallest power of two that maps amax inside +-448. floor: 2^(floor(log2 amax) - 8), 8 being the
    # exponent of E4M3's largest power of two (256).
    scales = e8m0_encode(amax / (MAX[E4M3] if rounding == "ceil" else 256.0), rounding)
    # Byte 0 (2^-127) is an fp32 subnormal; dividing by the smallest normal instead gives the same zeros.
    divisor = e8m0_decode(scales).clamp(min=torch.finfo(torch.float32).tiny)
    data = to_fp8(blocks / divisor[..., None]).reshape(rows, cols)
    return data, scales


def mxfp8_dequantize(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = data.shape
    blocks = data.float().reshape(rows, cols // MX_BLOCK, MX_BLOCK) * e8m0_decode(scales)[..., None]
    return blocks.reshape(rows, cols).to(dtype)


def mxfp8_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(x)) along the last dimension of a 2-D tensor, zero-padding columns to whole blocks."""
    rows, cols = x.shape
    padded = F.pad(x, (0, -cols % MX_BLOCK))
    return mxfp8_dequantize(*mxfp8_quantize(padded))[:, :cols].to(x.dtype)


# --- the FP8 GEMM -----------------------------------------------------------------------------------------------------
def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) for FP8 a (m, k), b (k, n) and fp32 scalar scales, in out_dtype.

    Not both operands may be E5M2 (the tensor cores have no such GEMM); k and n must be multiples of 16 for the fast
    path, which otherwise falls back to the emulation.
    """
    if _use_scaled_mm(a, b):
        # torch._scaled_mm wants a row-major and b column-major.
        return torch._scaled_mm(
            a.contiguous(), b.t().contiguous().t(), scale_a=scale_a.float(), scale_b=scale_b.float(),
            out_dtype=out_dtype,
        )
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def _use_scaled_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    if fast_path("fp8_gemm", a.is_cuda) != "scaled_mm":
        return False
    aligned = a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
    return aligned and torch.cuda.get_device_capability(a.device) >= (8, 9)
