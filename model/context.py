"""Context parallelism: the C ranks of a group each hold one contiguous slice of every sequence (rank r positions
[r t, (r + 1) t) of rows of C t tokens), and the layers exchange what crosses the slices:

- attention all-gathers keys, values and the documents (seq_idx); its queries attend at their absolute positions;
- Mamba-2 goes head-parallel (as Megatron-LM's mamba_context_parallel): an all-to-all turns this slice of every
  head's channels into the whole sequence of H / C heads, so each rank convolves and scans the whole sequence for its
  heads, and the inverse all-to-all brings the output back to the slice;
- the MTP head and its labels shift tokens along the whole row; the sequence-level aux loss counts whole sequences.

The runtime activates a group around forward and backward (`context_parallel`, see stages.runtime.context). Outside
one every function here is the identity, so one process runs as before. The collectives carry gradients: a gather's
backward sums each slice's gradient over the ranks (a reduce-scatter), an all-to-all's is the inverse all-to-all, a
sum's sums the gradients. They run eagerly under torch.compile (a graph break each), as the collectives are plain
process-group calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives and deprecated the old names, which torch 2.6 still needs.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ContextGroup:
    group: dist.ProcessGroup
    rank: int
    """This rank's place in the group: it holds slice `rank` of every sequence."""
    size: int


_ACTIVE: ContextGroup | None = None


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None) -> Iterator[ContextGroup | None]:
    """Within the block the layers treat their inputs as this rank's slices of sequences shared by `group`'s ranks
    (None: whole sequences, as outside any block). Forward and backward must both run inside it."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = None if group is None else ContextGroup(group, dist.get_rank(group), dist.get_world_size(group))
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def active() -> ContextGroup | None:
    """The context-parallel group of the running forward, or None."""
    return _ACTIVE


def size() -> int:
    """The ranks that share each sequence: 1 outside a group."""
    return 1 if _ACTIVE is None else _ACTIVE.size


@torch.compiler.disable
def gather_sequence(x: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
    """The whole sequences: every rank's slice of x, concatenated along `dim` in rank order (None stays None).
    The backward hands each rank the gradient of its slice summed over the ranks."""
    cp = active()
    if cp is None or x is None:
        return x
    return _Gather.apply(x, dim, cp)


def local_slice(full: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's slice of whole sequences along `dim`."""
    cp = active()
    if cp is None:
        return full
    width = full.shape[dim] // cp.size
    return full.narrow(dim, cp.rank * width, width)


def roll_sequence(x: torch.Tensor, shifts: int) -> torch.Tensor:
    """torch.roll(x, shifts, dims=1) of the whole rows, this rank's slice of it: token ids, labels, documents."""
    return local_slice(torch.roll(gather_sequence(x), shifts, dims=1))


def positions(rows: int, length: int, device: torch.device) -> torch.Tensor | None:
    """The absolute positions (rows, length) of this rank's slice in the whole rows, or None outside a group."""
    cp = active()
    if cp is None:
        return None
    return (cp.rank * length + torch.arange(length, device=device)).expand(rows, length)


@torch.compiler.disable
def sequence_to_heads(x: torch.Tensor) -> torch.Tensor:
    """x (b, t, C * k): this slice of the channels of all ranks, rank j's k channels j-th -> (b, C t, k): the whole
    sequence of this rank's k channels. Inverse of `heads_to_sequence`."""
    cp = active()
    return x if cp is None else _AllToAll.apply(x, cp, True)


@torch.compiler.disable
def heads_to_sequence(y: torch.Tensor) -> torch.Tensor:
    """y (b, C t, k): the whole sequence of this rank's k channels -> (b, t, C * k): this slice of every rank's
    channels, in rank order. Inverse of `sequence_to_heads`."""
    cp = active()
    return y if cp is None else _AllToAll.apply(y, cp, False)


@torch.compiler.disable
def sum_over_sequence(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the group's ranks (per-sequence totals of their slices); the backward sums the gradients,
    since every rank's loss uses the total."""
    cp = active()
    return x if cp is None else _Sum.apply(x, cp)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, cp: ContextGroup) -> torch.Tensor:
        ctx.dim, ctx.cp = dim, cp
        part = x.movedim(dim, 0).contiguous()
        full = part.new_empty(cp.size * part.shape[0], *part.shape[1:])
        _all_gather(full, part, group=cp.group)
        return full.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = ctx.cp
        full = grad.movedim(ctx.dim, 0).contiguous()
        part = full.new_empty(full.shape[0] // cp.size, *full.shape[1:])
        _reduce_scatter(part, full, group=cp.group)
        return part.movedim(0, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """to_heads: (b, t, C k) -> (b, C t, k); otherwise the inverse. Each direction's backward is the other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextGroup, to_heads: bool) -> torch.Tensor:
        ctx.cp, ctx.to_heads = cp, to_heads
        return _all_to_all(x, cp, to_heads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.cp, not ctx.to_heads), None, None


def _all_to_all(x: torch.Tensor, cp: ContextGroup, to_heads: bool) -> torch.Tensor:
    """One all-to-all over a leading dimension of C blocks: block j goes to rank j, block i comes from rank i."""
    b, t, ch, c = *x.shape, cp.size
    if to_heads:  # send block j of this slice's channels to rank j; receive slice i of this rank's channels from rank i
        send = x.view(b, t, c, ch // c).permute(2, 0, 1, 3).contiguous()
    else:  # send slice j of this rank's channels to rank j; receive this slice of rank i's channels from rank i
        send = x.view(b, c, t // c, ch).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=cp.group)
    if to_heads:  # (C, b, t, ch / C): the slices in rank order make the whole sequence
        return received.transpose(0, 1).reshape(b, c * t, ch // c)
    return received.permute(1, 2, 0, 3).reshape(b, t // c, c * ch)  # (C, b, t / C, ch): channels in rank order


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextGroup) -> torch.Tensor:
        ctx.cp = cp
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=cp.group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.cp.group)
        return total, None
