"""MoE dispatch: group token copies by expert, then one matmul per expert over its contiguous rows.

Fast path: `torch._grouped_mm` (one kernel for all experts) on CUDA in bf16; its CPU backward is broken in current
PyTorch, so CPU always takes the reference, which loops over experts (never over tokens).
"""

from __future__ import annotations

import torch

from kernels.backends import fast_path


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids (tokens, k) -> (order, counts): `order` lists the flat (token * k + slot) copies sorted by expert,
    stable, and counts (num_experts,) how many rows each expert gets."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (rows, in), grouped by expert in order; weight (experts, out, in). Returns (rows, out):
    row r of expert e is x[r] @ weight[e].T."""
    if fast_path("moe", x.is_cuda) == "grouped_mm" and x.dtype == torch.bfloat16:
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    pieces = [rows @ weight[e].T for e, rows in enumerate(x.split(counts.tolist())) if rows.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])
