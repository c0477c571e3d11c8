"""Packing samples into fixed-length rows with document isolation (REFERENCE.md sections 2 and 4), and the step
source that serves the rows to the training loop.

- Sources are read round-robin: a smooth weighted round-robin over the sources' samples (each source shuffled by the
  seed and taken `weight` times over: 2 repeats it, 0.5 takes half), so every stretch of the stream mixes them.
- Each buffer of the stream is packed best-fit decreasing: longest sample first, into the open row with the least
  room that still fits it and holds no sample of the same prompt; else a new row. A sample is never truncated or
  split; one longer than the row is dropped and counted.
- A row carries seq_idx (each sample its own document; the padding at the end another), and labels: the next token
  where it is trained and in the same sample, IGNORE elsewhere.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from kernels.cross_entropy import IGNORE
from stages.chat.masks import Sample
from stages.runtime.batches import MicroBatch

BUFFER = 4096
"""Samples packed together: enough for best-fit to find tight fits, few enough that sources stay interleaved."""


@dataclass
class PackingStats:
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    """Non-padding tokens."""
    trained: int = 0
    """Tokens that take a loss."""
    too_long: int = 0
    """Samples longer than a row, dropped."""
    seq_len: int = 0

    @property
    def efficiency(self) -> float:
        """Share of the rows' positions that hold tokens (not padding)."""
        return self.tokens / max(1, self.rows * self.seq_len)


@dataclass
class PackedRows:
    input_ids: np.ndarray
    """(rows, seq_len) int64"""
    labels: np.ndarray
    seq_idx: np.ndarray
    stats: PackingStats

    def __len__(self) -> int:
        return len(self.input_ids)

    def micro_batches(self, size: int) -> list[MicroBatch]:
        """All rows, in order, as micro-batches of `size` rows (validation)."""
        return [self.micro_batch(np.arange(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def micro_batch(self, rows: np.ndarray) -> MicroBatch:
        return MicroBatch(torch.from_numpy(self.input_ids[rows]), torch.from_numpy(self.labels[rows]),
                          torch.from_numpy(self.seq_idx[rows]))


def interleave(sources: list[list[Sample]], weights: list[float], seed: int) -> list[Sample]:
    """Every source's samples, each taken `weight` times over in a seeded order, in smooth weighted round-robin."""
    rng = random.Random(seed)
    queues = []
    for samples, weight in zip(sources, weights):
        order = list(samples)
        rng.shuffle(order)
        count = round(weight * len(order))
        queues.append([order[i % len(order)] for i in range(count)] if order else [])
    total = sum(len(q) for q in queues)
    taken = [0] * len(queues)
    stream = []
    for drawn in range(1, total + 1):
        # The source furthest behind its share of the stream so far.
        pick = max((i for i, q in enumerate(queues) if taken[i] < len(q)),
                   key=lambda i: len(queues[i]) * drawn / total - taken[i])
        stream.append(queues[pick][taken[pick]])
        taken[pick] += 1
    return stream


def pack(samples: list[Sample], seq_len: int, pad_id: int, buffer: int = BUFFER) -> PackedRows:
    """Best-fit-decreasing rows of `seq_len` tokens from the stream, buffer by buffer."""
    stats = PackingStats(seq_len=seq_len)
    rows: list[list[Sample]] = []
    for start in range(0, len(samples), buffer):
        chunk = [s for s in samples[start : start + buffer] if len(s) <= seq_len]
        stats.too_long += min(buffer, len(samples) - start) - len(chunk)
        packed = best_fit_decreasing([len(s) for s in chunk], seq_len, [s.prompt_key for s in chunk])
        rows += [[chunk[i] for i in row] for row in packed]
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    seq_idx = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        offset = 0
        for document, sample in enumerate(row):
            n = len(sample)
            end = offset + n
            input_ids[r, offset:end] = sample.ids
            labels[r, offset : end - 1] = np.where(sample.trained[1:], sample.ids[1:], IGNORE)
            seq_idx[r, offset:end] = document
            stats.samples += 1
            stats.tokens += n
            stats.trained += int(sample.trained[1:].sum())
            offset = end
        seq_idx[r, offset:] = len(row)  # the padding is a document of its own
    stats.rows = len(rows)
    return PackedRows(input_ids, labels, seq_idx, stats)


def best_fit_decreasing(lengths: list[int], capacity: int, keys: list[str] | None = None) -> list[list[int]]:
    """Rows of item indices, packed longest first into the open row with the least room that still fits (and, with
    `keys`, holds no item of the same key); every length must be at most `capacity`."""
    rows: list[list[int]] = []
    seen: list[set[str]] = []
    room: list[tuple[int, int]] = []  # (space left, row), sorted: the first that fits is the best fit
    for item in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        n = lengths[item]
        i = bisect.bisect_left(room, (n, -1))
        while keys is not None and i < len(room) and keys[item] in seen[room[i][1]]:
            i += 1
        if i < len(room):
            space, row = room.pop(i)
        else:
            space, row = capacity, len(rows)
            rows.append([])
            seen.append(set())
        rows[row].append(item)
        if keys is not None:
            seen[row].add(keys[item])
        bisect.insort(room, (space - n, row))
    return rows


class PackedChatBatches:
    """The training loop's step source over packed rows: each epoch in its own seeded order; micro-batch m of rank r
    holds rows [(m x world + r) x micro, ... + micro) of the step (as runtime.batches does), so one process with
    accumulation sees the batches `world` processes see. The position is the whole state (resume)."""

    def __init__(self, rows: PackedRows, micro_batch: int, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if not len(rows):
            raise ValueError("no packed rows to train on")
        self.rows, self.micro, self.global_batch = rows, micro_batch, global_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.sequence = 0
        """Rows drawn so far, all ranks."""
        self._orders: dict[int, np.ndarray] = {}

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.global_batch)

    def state_dict(self) -> dict:
        return {"sequence": self.sequence}

    def load_state_dict(self, state: dict) -> None:
        self.sequence = state["sequence"]

    def phase(self) -> str:
        return f"epoch {self.sequence // len(self.rows) + 1}"

    def next_step(self) -> list[MicroBatch]:
        per_rank = self.global_batch // self.world
        batches = []
        for m in range(per_rank // self.micro):
            first = self.sequence + (m * self.world + self.rank) * self.micro
            batches.append(self.rows.micro_batch(np.array([self._row(g) for g in range(first, first + self.micro)])))
        self.sequence += self.global_batch
        return batches

    def _row(self, g: int) -> int:
        epoch, position = divmod(g, len(self.rows))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return int(self._orders[epoch][position])
