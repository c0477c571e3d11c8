"""MoE dispatch: group token copies by expert, then one matmul per expert over its contiguous rows.

Fast path: `torch._grouped_mm` (one kernel for all experts) on CUDA in bf16; its CPU backward is broken in current
PyTorch, so CPU always takes the reference, which loops over experts (never over tokens).
"""

from __future__ import annotations

import torch

from kernels.backends import fast_path


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids (tokens, k) -> (order, inverse, counts): `order` lists the flat (token * k + slot) copies sorted by
    expert, stable; `inverse` is its inverse permutation; counts (num_experts,) how many rows each expert gets."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    counts = torch.bincount(flat, minlength=num_experts)
    return order, inverse, counts


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (rows, in), grouped by expert in order; weight (experts, out, in). Returns (rows, out):
    row r of expert e is x[r] @ weight[e].T."""
    if fast_path("moe", x.is_cuda) == "grouped_mm" and x.dtype == torch.bfloat16:
        offsets = counts.cumsum(0).to(torch.int32)
        # Under autocast the weights are still fp32 master copies; the grouped kernel wants one dtype.
        return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=offsets)
    experts = weight.unbind(0)  # one view per expert; indexing weight[e] would give each its own full-size gradient
    pieces = [rows @ experts[e].T for e, rows in enumerate(x.split(counts.tolist())) if rows.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` whose inverse is `inverse`: the gradient is a gather too, not the
    scatter-add autograd would use for a general index."""
    return _PermuteRows.apply(x, order, inverse)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
