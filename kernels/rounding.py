"""Stochastic rounding of fp32 values to fp16 or bf16: round up to the next representable value with probability equal
to the fractional distance, so the result is unbiased (E[round(x)] = x). Used for the fp16 Mamba state cache and for
gradients in the NVFP4 recipe; round-to-nearest is `x.to(dtype)`."""

from __future__ import annotations

import torch


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (any float) -> dtype (float16 or bfloat16). Values beyond the target's range saturate to its largest finite
    value; NaN stays NaN."""
    x = x.float()
    biggest = torch.finfo(dtype).max
    x = x.clamp(-biggest, biggest)
    nearest = x.to(dtype)
    # The two representable neighbours that bracket x: nearest and its neighbour on x's side.
    toward = torch.where(nearest.float() <= x, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward).clamp(-biggest, biggest)
    lo = torch.minimum(nearest, other).float()
    hi = torch.maximum(nearest, other).float()
    gap = hi - lo
    p_up = torch.where(gap > 0, (x - lo) / gap, torch.zeros_like(x))
    draw = torch.empty_like(x).uniform_(generator=generator)  # not rand(shape): compile rejects symbolic shapes there
    return torch.where(draw < p_up, hi, lo).to(dtype).where(~x.isnan(), x.to(dtype))
