"""Loss by position: the mean next-token loss of held-out long documents in buckets of position, the Nemotron 3
reports' long-context diagnostic (NLL by position on repository-level code). A model that uses its context has a
curve that keeps falling with position; one that cannot reach past its training length rises there."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels import linear_cross_entropy
from model.hybrid import NemotronH


@dataclass
class PositionLoss:
    edges: list[int]
    """Bucket i holds the predictions made at positions edges[i] <= p < edges[i + 1]."""
    nll: list[float]
    """Mean loss of each bucket, nats per token."""
    tokens: list[int]
    """Tokens scored in each bucket."""

    def past(self, position: int) -> float:
        """The mean loss of the predictions made at `position` or later (a bucket edge)."""
        i = self.edges.index(position)
        return float(np.average(self.nll[i:], weights=self.tokens[i:]))

    def summary(self) -> dict:
        return {"edges": self.edges, "nll": self.nll, "tokens": self.tokens}

    @classmethod
    def from_summary(cls, summary: dict) -> PositionLoss:
        return cls(summary["edges"], summary["nll"], summary["tokens"])


def bucket_edges(short_len: int, long_len: int) -> list[int]:
    """0, then doublings from the short length up to the long one: 0, 256, 512, ..., 4096 for 256 -> 4096."""
    edges, edge = [0], short_len
    while edge < long_len:
        edges.append(edge)
        edge *= 2
    return edges + [long_len]


@torch.no_grad()
def loss_by_position(model: NemotronH, documents: list[np.ndarray], length: int, edges: list[int]) -> PositionLoss:
    """Score the first length + 1 tokens of each document (each at least that long): the loss of predicting token
    p + 1 from tokens 0..p, averaged over documents within each bucket of p."""
    model.eval()
    sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1, dtype=np.int64)
    bucket = np.searchsorted(edges, np.arange(length), side="right") - 1
    for doc in documents:
        ids = torch.as_tensor(doc[: length + 1], dtype=torch.long)[None]
        hidden = model.model(ids[:, :-1])[0]
        _, losses = linear_cross_entropy(hidden, model.lm_head.weight, ids[0, 1:], torch.ones(length))
        sums += np.bincount(bucket, weights=losses.numpy(), minlength=len(sums))
        counts += np.bincount(bucket, minlength=len(sums))
    return PositionLoss(edges, (sums / np.maximum(counts, 1)).tolist(), counts.tolist())
