"""Scored rollouts as training batches: each sample (prompt + reply) a document of a packed row, best-fit, isolated
from its neighbours by seq_idx, with per-token fields for the policy losses.

A sample trains the reply tokens it sampled: the prompt and the tokens the engine forced (a `</think>` at the
thinking budget) take no loss. Position i of a row predicts the token at i + 1; `targets` holds that token where it
trains and IGNORE elsewhere, and the per-token fields (advantage, the engine's log-prob, the weight) sit at the same
positions, so the learner gathers them where `targets != IGNORE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cross_entropy import IGNORE
from stages.chat.packing import best_fit_decreasing
from stages.rollout.losses import token_weights
from stages.runtime.distributed import World


@dataclass
class Trajectory:
    """One sampled reply and what training needs of it."""

    prompt_ids: list[int]
    token_ids: list[int]
    behaviour_logp: list[float]
    """The engine's log-probs of token_ids, under the distribution they were sampled from."""
    trained: list[bool]
    """Per reply token: takes a loss (sampled, not forced)."""
    advantage: float
    env: str
    group: int
    """The prompt's index in the step: the samples of one prompt share it."""
    teacher_logp: list[float] | None = None
    """Per reply token, a teacher's log-prob of it (distillation: the advantage is teacher - pi_prox)."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.trained)


@dataclass
class PolicyMicroBatch:
    input_ids: torch.Tensor
    """(rows, seq_len) int64"""
    targets: torch.Tensor
    """(rows, seq_len) int64: at position i the sampled token i + 1 where it trains, IGNORE elsewhere."""
    seq_idx: torch.Tensor
    """(rows, seq_len) int64: each token's sample within its row (the padding is one more)."""
    advantages: torch.Tensor
    """(rows, seq_len) fp32, at the target positions."""
    behaviour_logp: torch.Tensor
    """(rows, seq_len) fp32, at the target positions."""
    weights: torch.Tensor
    """(rows, seq_len) fp32: the token's share of the global batch's loss (losses.token_weights), at the targets."""
    old_logp: torch.Tensor | None = None
    """(rows, seq_len) fp32, the learner's log-probs before the batch's first update; None: on-policy (the current
    forward's, detached)."""
    teacher_logp: torch.Tensor | None = None
    """(rows, seq_len) fp32 at the target positions, when the trajectories carry a teacher's log-probs: each token's
    advantage is then `advantages` + teacher_logp - old_logp."""

    @classmethod
    def empty(cls, seq_len: int, pad_id: int, rows: int = 1, teacher: bool = False) -> PolicyMicroBatch:
        """Rows of padding that train nothing: what packing fills in, and what a rank short of rows runs so that
        ranks stay in step (with a teacher_logp field where the step distills)."""
        shape = (rows, seq_len)
        return cls(torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long),
                   torch.zeros(shape, dtype=torch.long), torch.zeros(shape), torch.zeros(shape), torch.zeros(shape),
                   teacher_logp=torch.zeros(shape) if teacher else None)

    def gather(self, field: torch.Tensor) -> torch.Tensor:
        """A per-token field at the trained positions, flattened in row-major order (as the learner's log-probs)."""
        return field[self.targets != IGNORE]


def pack_trajectories(
    trajectories: list[Trajectory], token_weights: list[torch.Tensor], seq_len: int, rows_per_micro: int, pad_id: int,
) -> list[PolicyMicroBatch]:
    """Rows of `seq_len` tokens, best-fit decreasing, `rows_per_micro` to a micro-batch; token_weights[i] is the
    weight of each trained token of trajectory i. Every trajectory must fit a row."""
    too_long = [len(t) for t in trajectories if len(t) > seq_len]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit rows of {seq_len}")
    rows = best_fit_decreasing([len(t) for t in trajectories], seq_len)
    batches = []
    for start in range(0, len(rows), rows_per_micro):
        chunk = rows[start : start + rows_per_micro]
        batch = PolicyMicroBatch.empty(seq_len, pad_id, len(chunk), teacher=trajectories[0].teacher_logp is not None)
        for r, row in enumerate(chunk):
            offset = 0
            for document, i in enumerate(row):
                offset = _place(batch, r, offset, document, trajectories[i], token_weights[i])
            batch.seq_idx[r, offset:] = len(row)
        batches.append(batch)
    return batches


def _place(batch: PolicyMicroBatch, row: int, offset: int, document: int, t: Trajectory, weights: torch.Tensor
           ) -> int:
    """Write trajectory t into `row` at `offset`; returns where the next one starts."""
    ids = t.prompt_ids + t.token_ids
    end = offset + len(ids)
    batch.input_ids[row, offset:end] = torch.tensor(ids)
    batch.seq_idx[row, offset:end] = document
    # The token at reply position j is predicted at row position offset + len(prompt) + j - 1.
    first = offset + len(t.prompt_ids) - 1
    trained = torch.tensor(t.trained, dtype=torch.bool)
    positions = torch.arange(first, first + len(t.token_ids))[trained]
    batch.targets[row, positions] = torch.tensor(t.token_ids)[trained]
    batch.advantages[row, positions] = t.advantage
    batch.behaviour_logp[row, positions] = torch.tensor(t.behaviour_logp)[trained]
    batch.weights[row, positions] = weights
    if batch.teacher_logp is not None:
        batch.teacher_logp[row, positions] = torch.tensor(t.teacher_logp)[trained]
    return end


def rank_micro_batches(kept: list[Trajectory], normalisation: str, seq_len: int, rows_per_micro: int, world: World,
                       pad_id: int, teacher: bool = False) -> list[PolicyMicroBatch]:
    """This rank's trajectories packed into micro-batches, as many on every rank (empty ones where a rank has fewer),
    with each token's weight in the global batch's loss (losses.token_weights; collective under torchrun)."""
    tokens, sequences = world.all_reduce(torch.tensor([float(sum(t.trained_tokens for t in kept)), float(len(kept))]))
    weights = [token_weights([t.trained_tokens], normalisation, int(tokens), int(sequences)) for t in kept]
    batches = pack_trajectories(kept, weights, seq_len, rows_per_micro, pad_id)
    most = int(world.max(max(1, len(batches))))
    return batches + [PolicyMicroBatch.empty(seq_len, pad_id, teacher=teacher) for _ in range(most - len(batches))]
