"""Context parallelism for training (parallel.context = C under torchrun): groups of C consecutive ranks share each
sequence, rank r of a group holding the r-th contiguous slice of every row; the layers exchange what crosses the
slices (model.context).

The contract for a stage that trains with it (and says so to distributed.check_layout):

    layout = ContextLayout.setup(cfg, world)     # collective; a no-op layout when C = 1 or in one process
    batches = SomeBatches(..., rank=layout.data_rank, world=layout.data_size)   # whole rows, per data-parallel rank
    job = TrainingJob(..., context=layout)       # the loop slices every micro-batch and runs under the group
    evaluate = validation(objective, val, compute, world, layout)

Ranks [d C, (d + 1) C) form group d: data-parallel rank d of world / C. The ranks of a group read the same rows and
train on their slices; their gradients are partial sums, which the data-parallel wrapper (DDP or FSDP2, over the whole
world) adds up with everyone else's. The loop's loss normalisation stays exact: each rank's summed token losses over
its slice are divided by the valid-label count of the whole global batch (all slices, all ranks) and multiplied by
the world, which the wrapper divides back, so the gradient is that of one process over the global batch.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from model.context import context_parallel
from model.errors import UserError
from presets.schema import RunConfig
from stages.runtime.distributed import World

Batch = TypeVar("Batch")


@dataclass(frozen=True)
class ContextLayout:
    size: int
    """C: the ranks that share each sequence (1: none)."""
    rank: int
    """This rank's place in its group: the slice of every row it trains on."""
    data_rank: int
    """The data-parallel rank: which rows this rank's group reads (rank // C)."""
    data_size: int
    """The data-parallel degree: how many groups read different rows (world / C)."""
    group: dist.ProcessGroup | None = None
    """The ranks of this rank's group (None when size is 1)."""

    @classmethod
    def single(cls, world: World) -> ContextLayout:
        """No context parallelism: every rank reads rows of its own."""
        return cls(size=1, rank=0, data_rank=world.rank, data_size=world.size)

    @classmethod
    def setup(cls, cfg: RunConfig, world: World) -> ContextLayout:
        """The layout of parallel.context on this world; collective (every rank builds every group, as
        torch.distributed wants). One process, or C = 1, gets the single layout."""
        size = cfg.parallel.context
        if size == 1 or not world.distributed:
            return cls.single(world)
        if world.size % size:
            raise UserError(f"parallel.context ({size}) must divide the {world.size} processes")
        # A group of its own even when it spans the world: the data-parallel wrapper's gradient reductions on the
        # default group then never interleave with the layers' collectives.
        groups = [dist.new_group(list(range(d * size, (d + 1) * size))) for d in range(world.size // size)]
        return cls(size, world.rank % size, world.rank // size, world.size // size, groups[world.rank // size])

    def slice(self, batch: Batch) -> Batch:
        """This rank's slice of every per-token field (b, t, ...) of a micro-batch (batches.MicroBatch or a
        dataclass like it, with input_ids); other fields as they are."""
        if self.size == 1:
            return batch
        rows, length = batch.input_ids.shape
        if length % self.size:
            raise UserError(f"sequences of {length} tokens do not split into parallel.context = {self.size} equal "
                            f"slices: make the sequence length a multiple of {self.size}")
        width = length // self.size

        def cut(value):
            per_token = isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length)
            return value[:, self.rank * width : (self.rank + 1) * width] if per_token else value

        return dataclasses.replace(batch, **{f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)})

    def active(self) -> AbstractContextManager:
        """The block forward and backward of this rank's slices run in."""
        return context_parallel(self.group)
