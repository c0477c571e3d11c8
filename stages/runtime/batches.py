"""Packed training batches from a prepared corpus, following its blend and two-phase curriculum, and resumable.

Packing: each source's training documents (bos, tokens, eos), in an order shuffled once by the run's seed, form one
stream. A sequence is the next seq_len + 1 tokens of a source's stream (inputs = the first seq_len, labels = the last
seq_len); the next sequence from that source starts seq_len tokens later, so every token is predicted once per epoch;
streams wrap around. Documents share sequences; the label after an eos (the next document's start) is ignored, so no
loss crosses a document boundary. (The shuffle matters: shards keep the sources' file order, where similar files sit
together.)

Blend: sequence g of the run comes from the source the smooth weighted round-robin picks among the phase's weights
(deterministic: no random state to save), in phase 1 until switch_at of the run's sequences, then phase 2.

Distribution: the step's global batch is cut into micro-batches; micro-batch m of rank r holds sequences
[(m * world + r) * micro, ... + micro) of the step, so one process with accumulation sees the same sequences in the
same micro-batches as `world` processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.cross_entropy import IGNORE
from stages.runtime.corpus import Manifest, read_index, read_tokens


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """(micro, seq_len) int64"""
    labels: torch.Tensor
    """(micro, seq_len) int64, IGNORE where no loss is taken"""
    seq_idx: torch.Tensor | None = None
    """(micro, seq_len) int64, each token's document within its row, for rows of isolated documents (packed chat
    samples); None lets documents see each other (pretraining's packed corpus)."""


def pack(window: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one seq_len + 1 window; labels after an eos are ignored."""
    window = window.astype(np.int64)
    inputs, labels = window[:-1], window[1:].copy()
    labels[inputs == eos_id] = IGNORE
    return inputs, labels


class PackedBatches:
    def __init__(
        self, directory: Path, manifest: Manifest, seq_len: int, micro_batch: int, global_batch: int,
        total_steps: int, rank: int = 0, world: int = 1, seed: int = 0,
    ):
        self.manifest = manifest
        self.seq_len, self.micro, self.global_batch = seq_len, micro_batch, global_batch
        self.rank, self.world = rank, world
        self.total_sequences = total_steps * global_batch
        self.streams = {s.name: read_tokens(directory, manifest, s.name, "train") for s in manifest.sources}
        self.orders = {}
        """Per source: its documents' (start, length) in the shard, in stream order, and where each ends in the stream."""
        for i, source in enumerate(manifest.sources):
            documents = read_index(directory, source.name, "train")
            documents = documents[np.random.default_rng([seed, i]).permutation(len(documents))]
            self.orders[source.name] = (documents, np.cumsum(documents[:, 1]))
        self.sequence = 0
        """Sequences of the run drawn so far (all ranks)."""
        self.taken = {name: 0 for name in self.streams}
        """Sequences drawn from each source: its position in its stream."""
        self.phase_drawn = {name: 0 for name in self.streams}
        """Sequences drawn from each source in the current phase (the round-robin's memory)."""
        self.phase_index = 0

    def state_dict(self) -> dict:
        return {"sequence": self.sequence, "taken": dict(self.taken), "phase_drawn": dict(self.phase_drawn),
                "phase_index": self.phase_index}

    def load_state_dict(self, state: dict) -> None:
        self.sequence, self.phase_index = state["sequence"], state["phase_index"]
        self.taken, self.phase_drawn = dict(state["taken"]), dict(state["phase_drawn"])

    def phase(self) -> str:
        return self.manifest.phases[self.phase_index].name

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step."""
        per_rank = self.global_batch // self.world
        mine = {
            (m * self.world + self.rank) * self.micro + i
            for m in range(per_rank // self.micro) for i in range(self.micro)
        }
        windows = []
        for j in range(self.global_batch):
            source = self._choose()
            if j in mine:
                windows.append(self._window(source))
            self.taken[source] += 1
            self.sequence += 1
        pairs = [pack(w, self.manifest.eos_id) for w in windows]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return [MicroBatch(x, y) for x, y in zip(inputs.split(self.micro), labels.split(self.micro))]

    def _choose(self) -> str:
        phase_index = 0 if self.sequence < self.manifest.switch_at * self.total_sequences else 1
        phase_index = min(phase_index, len(self.manifest.phases) - 1)
        if phase_index != self.phase_index:
            self.phase_index = phase_index
            self.phase_drawn = dict.fromkeys(self.phase_drawn, 0)
        weights = self.manifest.phases[phase_index].weights
        drawn = sum(self.phase_drawn.values()) + 1
        # Smooth weighted round-robin: the source furthest behind its share so far.
        source = max(weights, key=lambda name: weights[name] * drawn - self.phase_drawn[name])
        self.phase_drawn[source] += 1
        return source

    def _window(self, source: str) -> np.ndarray:
        documents, ends = self.orders[source]
        start = self.taken[source] * self.seq_len
        positions = np.arange(start, start + self.seq_len + 1) % ends[-1]
        which = np.searchsorted(ends, positions, side="right")
        offsets = positions - (ends[which] - documents[which, 1])
        return self.streams[source][documents[which, 0] + offsets]


def validation_batches(
    directory: Path, manifest: Manifest, seq_len: int, sequences: int, micro_batch: int
) -> list[MicroBatch]:
    """Up to `sequences` windows spread evenly over the validation splits of all sources; the same every time."""
    streams = [read_tokens(directory, manifest, s.name, "val") for s in manifest.sources]
    stream = np.concatenate([np.asarray(s) for s in streams]) if streams else np.zeros(0, dtype=np.int64)
    if len(stream) < 2:
        return []
    available = max(1, (len(stream) - 1) // seq_len)
    count = min(sequences, available)
    starts = np.linspace(0, max(0, len(stream) - seq_len - 1), count).round().astype(np.int64)
    inputs, labels = [], []
    for start in starts:
        window = stream[start : start + seq_len + 1]
        x, y = pack(window, manifest.eos_id)
        pad = seq_len - len(x)  # a validation split shorter than one sequence
        inputs.append(np.pad(x, (0, pad), constant_values=manifest.pad_id))
        labels.append(np.pad(y, (0, pad), constant_values=IGNORE))
    x, y = torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels))
    return [MicroBatch(a, b) for a, b in zip(x.split(micro_batch), y.split(micro_batch))]
