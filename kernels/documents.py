"""Document boundaries of packed rows as `seq_idx` (b, t): the index of each token's document within its row,
non-decreasing along the row (cu_seqlens [0, 5, 7, 11] -> 0 0 0 0 0 1 1 2 2 2 2), as Megatron and mamba_ssm take them.

Attention, the causal conv and the SSD scan read it to keep every document to itself; flash-attn's varlen kernel
wants the flat cu_seqlens form back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def seq_idx_from_lengths(lengths: Sequence[Sequence[int]], seqlen: int) -> torch.Tensor:
    """Document lengths per row -> seq_idx (rows, seqlen) int64. A row whose lengths sum to less than seqlen ends in
    one more document (its padding), so padding never joins a real document."""
    rows = []
    for row in lengths:
        row = [int(n) for n in row]
        if any(n < 0 for n in row) or sum(row) > seqlen:
            raise ValueError(f"document lengths {row} must be non-negative and sum to at most {seqlen}")
        if sum(row) < seqlen:
            row.append(seqlen - sum(row))
        rows.append(torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row, dtype=torch.long)))
    return torch.stack(rows)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Flat cumulative document lengths [0, ..., total] -> seq_idx (1, total) int64 (on cu_seqlens' device)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
    lengths = cu.diff()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)[None]


def cu_seqlens_from_seq_idx(seq_idx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """seq_idx (b, t) -> (cu_seqlens int32 (documents + 1,), the longest document's length) over the b * t tokens
    flattened row after row: every row starts a document. Reads the lengths back to the host (flash-attn needs them)."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    ends = torch.tensor([seq_idx.numel()], device=seq_idx.device)
    cu_seqlens = torch.cat([starts.flatten().nonzero().squeeze(1), ends]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
