"""The dense relu^2 MLP: down(relu(up(x))^2), no gate, no bias. Also the shared expert of LatentMoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, keeping only relu(x) for the backward (2 relu(x) * grad): one tensor saved instead of two."""
    return _ReLU2.apply(x)


class _ReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim); token by token, so the cache and documents (seq_idx) of the mixer interface play no part."""
        return self.down_proj(relu2(self.up_proj(x)))
