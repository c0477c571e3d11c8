"""Expert parallelism inside a LatentMoE layer: the routed experts split over a group of E ranks, tokens exchanged.

Rank i of a group holds experts [i L, (i + 1) L), L = experts / E. Each rank routes its own tokens over all the
experts, then (Experts.forward with `parallel` set):

    copies sorted by global expert  --all_to_all (variable splits)-->  rows for my L experts, by source rank
    regroup by local expert, one grouped GEMM per expert pair (up, relu^2, down), regroup back
    --inverse all_to_all-->  each copy's output back on the rank of its token, in the order it left

No token is dropped (no capacity limit, as Nemotron trains). The backward of an all-to-all is the all-to-all with the
splits swapped, so each rank's expert gradients sum the contributions of every token of its group that chose them;
the data-parallel wrapper (stages.runtime.expert_parallel) adds up the groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels import group_by_expert, permute_rows


@dataclass
class ExpertGroup:
    """The ranks that split the MoE layers' experts between them (this rank holds the share of its place)."""

    group: dist.ProcessGroup
    size: int
    gradient_scale: float = 1.0
    """What the expert weights' gradients are multiplied by, for the data-parallel reduction that follows to give
    the gradient of the global batch (set by the trainer: stages.runtime.expert_parallel)."""
    received: int = 0
    """Token copies this rank's experts received since the last `take_counters` (metrics)."""
    exchange_seconds: float = 0.0
    """Wall time spent in the forward all-to-alls since the last `take_counters`."""

    def take_counters(self) -> tuple[int, float]:
        """(copies received, seconds in all-to-all) since the last call, and reset them."""
        counters = (self.received, self.exchange_seconds)
        self.received, self.exchange_seconds = 0, 0.0
        return counters


def exchange(rows: torch.Tensor, counts: torch.Tensor, parallel: ExpertGroup, compute) -> torch.Tensor:
    """rows (copies, l) sorted by global expert, counts (experts,) rows per expert -> the experts' outputs for the
    same rows in the same order, the experts living on the ranks of `parallel`. `compute(rows, counts)` runs this
    rank's experts on rows grouped by local expert (counts (L,))."""
    local = counts.numel() // parallel.size
    started = time.perf_counter()
    # received[s, j]: rows source rank s sends to my local expert j
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=parallel.group)
    received = received.view(parallel.size, local)
    send_splits = counts.view(parallel.size, local).sum(1).tolist()
    recv_splits = received.sum(1).tolist()
    incoming = _AllToAll.apply(rows, recv_splits, send_splits, parallel.group)
    parallel.exchange_seconds += time.perf_counter() - started
    parallel.received += sum(recv_splits)
    # arrived by (source, local expert); the grouped GEMM wants (local expert, source)
    experts = torch.arange(local, device=counts.device).repeat(parallel.size)
    order, inverse, per_expert = group_by_expert(experts.repeat_interleave(received.flatten()), local)
    out = permute_rows(compute(permute_rows(incoming, order, inverse), per_expert), inverse, order)
    started = time.perf_counter()
    back = _AllToAll.apply(out, send_splits, recv_splits, parallel.group)
    parallel.exchange_seconds += time.perf_counter() - started
    return back


def scale_gradient(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """`weight` in the forward; its gradient times `scale` in the backward."""
    return weight if scale == 1.0 else _ScaleGradient.apply(weight, scale)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale: float):
        ctx.scale = scale
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient goes back the way the rows came."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None
