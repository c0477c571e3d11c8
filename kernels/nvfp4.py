"""NVFP4: E2M1 elements with one E4M3 scale per block of 16 and an fp32 per-tensor scale (REFERENCE.md section 3).

    s_g = amax_tensor / (6 * 448)                      fp32, the per-tensor (global) scale
    s_b = e4m3(amax_block / (6 * s_g))                 per block: 1x16 (activations, export), 16x16 (training weights)
    q   = E2M1(x / (s_b * s_g))                        round to nearest, ties to even; or stochastic (gradients)
    x'  = q * (s_b * s_g)

The operation order is modelopt's `NVFP4QTensor` (the export reference): codes and scales are byte-identical to it,
all-zero blocks included (stored scale 1.0), and to torchao's `NVFP4Tensor` on fp32 inputs. Block scales below the
smallest E4M3 subnormal (2^-9) are clamped to it.

Four-Over-Six (arXiv 2512.02010) maps each block's max either to 6 or to 4, keeping the one with the lower error; its
global scale uses 256 instead of 448 so that the 1.5x larger "4" scale stays representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

E2M1_MAX = 6.0
E4M3_MAX = 448.0
FOUR_OVER_SIX_E4M3_MAX = 256.0
"""Largest block scale the Four-Over-Six global scale plans for: 256 * 1.5 = 384 <= 448."""
E4M3_MIN_SUBNORMAL = 2.0**-9
BLOCK = 16

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of E2M1 codes 0..7; code 8 + i is the negative of code i (8 is -0)."""
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
"""The midpoints between grid values, and whether a tie there rounds up: it does where the upper neighbour has the
even mantissa (0.75 -> 1, 1.75 -> 2, 3.5 -> 4) and rounds down elsewhere."""


def _grid(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_GRID, device=device)


# --- E2M1 elements ---------------------------------------------------------------------------------------------------
def e2m1_encode(x: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Values already divided by their scale -> E2M1 codes (uint8, 0..15), saturating at 6.

    Round to nearest, ties to the even mantissa; with `stochastic`, round up to the next grid value with probability
    equal to the fractional distance (unbiased inside [-6, 6]). Negative values keep the sign bit even when they
    round to zero (code 8).
    """
    x = x.float()
    magnitude = x.abs()
    if stochastic:
        grid = _grid(x.device)
        magnitude = magnitude.clamp(max=E2M1_MAX)
        lower = (torch.searchsorted(grid, magnitude, right=True) - 1).clamp(max=len(E2M1_GRID) - 2)
        upper = lower + 1
        p_up = (magnitude - grid[lower]) / (grid[upper] - grid[lower])
        # uniform_ rather than rand(shape): under torch.compile rand rejects symbolic shapes
        draw = torch.empty_like(magnitude).uniform_(generator=generator)
        index = torch.where(draw < p_up, upper, lower)
    else:
        index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        for midpoint, tie_up in _MIDPOINTS:
            index += magnitude >= midpoint if tie_up else magnitude > midpoint
    return index.to(torch.uint8) + ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> fp32 values."""
    codes = codes.long()
    magnitude = _grid(codes.device)[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dimension: element 2k in the low nibble, 2k+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be even to pack FP4 codes")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_fp4."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


# --- NVFP4 tensors ---------------------------------------------------------------------------------------------------
@dataclass
class NVFP4Tensor:
    """A 2-D tensor in NVFP4: packed E2M1 codes, E4M3 block scales and the fp32 global scale."""

    packed: torch.Tensor
    """uint8 (rows, cols / 2): two codes per byte (see pack_fp4)."""
    block_scale: torch.Tensor
    """float8_e4m3fn, one per block: (rows, cols / 16) for 1x16 blocks, (rows / 16, cols / 16) for 16x16."""
    global_scale: torch.Tensor
    """fp32 scalar s_g; the decoded value is code * block_scale * global_scale."""
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = e2m1_decode(unpack_fp4(self.packed))
        return _per_block(values, self.block_scale.float() * self.global_scale, self.block, torch.mul).to(dtype)


def global_scale(amax: torch.Tensor, four_over_six: bool = False) -> torch.Tensor:
    """s_g = amax / (6 * 448), or / (6 * 256) for Four-Over-Six; 1.0 for an all-zero tensor (every code is then 0)."""
    s_g = amax.float() / (E2M1_MAX * (FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX))
    return torch.where(s_g > 0, s_g, torch.ones_like(s_g))


def block_scales(block_amax: torch.Tensor, s_g: torch.Tensor, target: float = E2M1_MAX) -> torch.Tensor:
    """E4M3 scale mapping each block's max to `target` (6, or 4 for Four-Over-Six); all-zero blocks get 1.0."""
    scale = block_amax.float() / (target * s_g)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_quantize(
    x: torch.Tensor,
    block: tuple[int, int] = (1, BLOCK),
    amax: torch.Tensor | None = None,
    four_over_six: str | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> NVFP4Tensor:
    """Quantize a 2-D tensor (rows, cols) to NVFP4; cols must be a multiple of 16 (of block for 16x16 blocks).

    block: (1, 16) for 1-D blocks along the last dimension, (16, 16) for 2-D tiles (rows a multiple of 16).
    amax: the tensor's absolute max (a calibrated value for activations); computed from x when None.
    four_over_six: None (map each block max to 6), "mse" or "mae" (per block keep the scale, 6 or 4, with the lower
    error; ties keep 6). stochastic: stochastic rounding of the elements (for gradients).
    """
    codes, scales, s_g = _quantize(x, block, amax, four_over_six, stochastic, generator)
    return NVFP4Tensor(pack_fp4(codes), scales, s_g, block)


def nvfp4_fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int] = (1, BLOCK),
    amax: torch.Tensor | None = None,
    four_over_six: str | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, for any 2-D shape: rows and columns are zero-padded to whole blocks
    (zeros change no block max) and cropped back. This is what emulated NVFP4 GEMMs multiply."""
    rows, cols = x.shape
    padded = F.pad(x, (0, -cols % block[1], 0, -rows % block[0]))
    codes, scales, s_g = _quantize(padded, block, amax, four_over_six, stochastic, generator)
    values = _per_block(e2m1_decode(codes), scales.float() * s_g, block, torch.mul)
    return values[:rows, :cols].to(x.dtype)


def _quantize(x, block, amax, four_over_six, stochastic, generator):
    if x.dim() != 2 or x.shape[1] % block[1] or x.shape[0] % block[0]:
        raise ValueError(f"NVFP4 with {block[0]}x{block[1]} blocks needs a 2-D tensor of whole blocks, "
                         f"got {tuple(x.shape)}")
    if four_over_six not in (None, "mse", "mae"):
        raise ValueError(f"four_over_six must be None, 'mse' or 'mae', got {four_over_six!r}")
    if amax is None:
        amax = x.abs().amax()
    s_g = global_scale(amax, four_over_six is not None)
    block_amax = _blocks(x, block).abs().amax(dim=(1, 3))
    scales = block_scales(block_amax, s_g)
    codes = _encode(x, scales, s_g, block, stochastic, generator)
    if four_over_six is None:
        return codes, scales, s_g
    scales4 = block_scales(block_amax, s_g, target=4.0)
    codes4 = _encode(x, scales4, s_g, block, stochastic, generator)
    error6 = _block_error(x, codes, scales, s_g, block, four_over_six)
    error4 = _block_error(x, codes4, scales4, s_g, block, four_over_six)
    use4 = error4 < error6
    scales = torch.where(use4, scales4.float(), scales.float()).to(torch.float8_e4m3fn)
    codes = torch.where(use4[:, None, :, None], _blocks(codes4, block), _blocks(codes, block)).reshape(x.shape)
    return codes, scales, s_g


def _encode(x, scales, s_g, block, stochastic, generator):
    return e2m1_encode(_per_block(x, scales.float() * s_g, block, torch.div), stochastic, generator)


def _block_error(x, codes, scales, s_g, block, kind):
    difference = x.float() - _per_block(e2m1_decode(codes), scales.float() * s_g, block, torch.mul)
    per_element = difference.square() if kind == "mse" else difference.abs()
    return _blocks(per_element, block).sum(dim=(1, 3))


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) -> (rows / br, br, cols / bc, bc)."""
    rows, cols = x.shape
    return x.reshape(rows // block[0], block[0], cols // block[1], block[1])


def _per_block(x: torch.Tensor, per_block: torch.Tensor, block: tuple[int, int], op) -> torch.Tensor:
    """op(element, its block's value) for every element, e.g. torch.div by the block scale."""
    return op(_blocks(x, block), per_block[:, None, :, None]).reshape(x.shape)
