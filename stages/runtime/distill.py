"""The MTP head distilled from its own model (`n3 mtp-boost`, REFERENCE.md section 4): the training loop's objective.

The backbone, embeddings and lm_head are frozen; the MTP block alone trains, on the model's own replies. MTP depth k
at position i predicts token i + k + 1, which the backbone predicts at position i + k, so the loss is

    T^2 / N  sum_k  (1 / |A_k|) sum_i  KL( softmax(z_{i+k} / T) || softmax(z^{mtp_k}_i / T) )

over the positions whose target is a trained (assistant) token in the same document, |A_k| their number over the
global batch (the loop's per-head counts), no cross-entropy, in fp32 over vocabulary chunks (kernels.distill).

The input of depth k > 1 is depth k - 1's output (`recursion`, as the engine drafts), or with `mixing` (Megatron's
mtp_hsm) each position draws it uniformly from the states that have read the same tokens: the backbone at i + k - 1,
depth 1 at i + k - 2, ..., depth k - 1 at i, so the head learns to draft from its own imperfect states as well as
from the backbone's. A candidate whose position lies past the row's end or in another document falls back to the
newest (depth k - 1 at i).

Under the loop's contract (losses.CausalLMObjective's): head 0 reports the frozen model's own next-token loss on the
replies (weight 0: nothing of the backbone trains), heads 1..N the mean KL of each depth; the expert load and the aux
loss are the MTP block's MoE's.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import linear_cross_entropy
from kernels.cross_entropy import IGNORE
from kernels.distill import linear_kl
from model.hybrid import NemotronH
from presets.schema import CHOICES, TrainConfig
from stages.runtime.losses import aux_terms, expert_load, moe_layers, mtp_labels

INPUTS = CHOICES["mtp_boost.inputs"]


class MTPDistillObjective(nn.Module):
    def __init__(self, model: NemotronH, depths: int, temperature: float, inputs: str = "mixing"):
        super().__init__()
        if model.mtp is None:
            raise ValueError("the model has no MTP head to distill into")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
        self.model, self.mtp_depths, self.temperature, self.inputs = model, depths, temperature, inputs
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("mtp."))
        self.main_moes, self.mtp_moes = [], moe_layers(model)[1]
        self.moe_names = [f"mtp.{j}" for j, kind in enumerate(model.config.mtp_pattern) if kind == "E"]

    @property
    def heads(self) -> int:
        return 1 + self.mtp_depths

    def head_scales(self, train: TrainConfig) -> list[float]:
        """The weight of each head's mean loss: none for the frozen next-token head, T^2 / N for each depth."""
        return [0.0] + [self.temperature**2 / self.mtp_depths] * self.mtp_depths

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, weights: list[float] | None = None,
                seq_idx: torch.Tensor | None = None) -> dict:
        model = self.model
        weight = model.lm_head.weight
        with torch.no_grad():
            h = model.model(input_ids, seq_idx=seq_idx)
            _, ce = linear_cross_entropy(h.flatten(0, 1), weight, labels.flatten(),
                                         torch.ones(labels.numel(), device=labels.device))
        history, sums = [h], [ce.sum()]
        aux, loads = h.new_zeros(()), [0.0] * len(self.mtp_moes)
        for k in range(1, self.mtp_depths + 1):
            start = mixed_input(history, seq_idx) if self.inputs == "mixing" and k > 1 else history[-1]
            hk = model.mtp_depth(start, input_ids, k, seq_idx)
            history.append(hk)
            trained = mtp_labels(labels, k, seq_idx) != IGNORE
            teacher = torch.roll(h, -k, dims=1)  # the backbone at i + k predicts what depth k predicts at i
            sums.append(linear_kl(hk[trained], teacher[trained], weight, self.temperature).sum())
            if self.training:  # MoE layers keep their routing only in training
                aux = aux + aux_terms(self.mtp_moes, input_ids.shape[0], h.device)
                loads = [total + expert_load(moe.last_routing[1], moe.gate.weight.shape[0])
                         for total, moe in zip(loads, self.mtp_moes)]
        head_sums = torch.stack(sums)
        if not self.training or weights is None:
            return {"head_sums": head_sums.detach()}
        loss = sum(w * s for w, s in zip(weights[1 : self.heads], sums[1:])) + weights[self.heads] * aux
        return {"loss": loss, "head_sums": head_sums.detach(), "aux": aux.detach(),
                "expert_load": torch.stack(loads) if loads else h.new_zeros(0, 0), "residual_rms": h.new_zeros(0)}


def mixed_input(history: list[torch.Tensor], seq_idx: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The input of depth k = len(history) under hidden-state mixing: history[j] (b, t, d) is depth j's output (0:
    the backbone's); each position i takes, uniformly, history[j] at i + k - 1 - j, or the newest where that position
    is past the row or in another document."""
    k, newest = len(history), history[-1]
    b, t, _ = newest.shape
    choice = torch.randint(k, (b, t), device=newest.device, generator=generator)
    mixed = newest
    positions = torch.arange(t, device=newest.device)
    for j, state in enumerate(history[:-1]):
        shift = k - 1 - j
        valid = (positions + shift < t).expand(b, t)
        if seq_idx is not None:
            valid = valid & (torch.roll(seq_idx, -shift, dims=1) == seq_idx)
        take = (choice == j) & valid
        mixed = torch.where(take[..., None], torch.roll(state, -shift, dims=1), mixed)
    return mixed
