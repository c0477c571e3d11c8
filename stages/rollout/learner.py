"""The learner's side of policy-gradient training: the policy objective (log-probs of sampled tokens through the
model) and one rollout batch's gradient accumulation, on every rank.

PolicyObjective wraps a NemotronH so that DDP and FSDP2 wrap it and see lm_head used inside its forward. It returns
the log-probs (kernels.logprobs, under the distribution the engine sampled from) and entropies of the target tokens,
flattened in row-major order, and the expert load of the forward for the aux-loss-free bias update. The MTP head
takes no part: the objective freezes it (mtp-boost trains it).

Distribution: each rank trains the rows of its own rollouts; ranks run the same number of micro-batches (a rank
short of rows runs empty ones, so the collectives of DDP and FSDP2 match), and the token weights are shares of the
global batch, so the summed gradients equal one process's over all the rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from kernels.cross_entropy import IGNORE
from kernels.logprobs import linear_logprobs
from model.hybrid import NemotronH
from stages.rollout.batches import PolicyMicroBatch
from stages.rollout.losses import clipped_policy_loss
from stages.runtime import distributed
from presets.schema import TrainConfig
from stages.runtime.distributed import World
from stages.runtime.losses import expert_load, moe_layers


@dataclass(frozen=True)
class Sampling:
    """The sampler's settings the rollouts used: the learner's log-probs are of the same distribution."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class PolicyLossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    tis_cap: float = 0.0
    """The behaviour correction pi_old / pi_engine against the engine's log-probs, capped here; 0: off."""
    kl_coeff: float = 0.0
    tis_mode: str = "cap"
    """cap: min(correction, tis_cap) (truncated importance sampling) | mask: the correction, and no loss where it
    exceeds tis_cap."""


def rollout_table(train: TrainConfig, world: World, data_parallel: int) -> TrainConfig:
    """A policy-gradient stage's optimisation table with its batch made by the rollouts, not global_batch_size: that
    is set to one micro-batch per rank, which the checks of an optimisation table then accept."""
    return dataclasses.replace(train, global_batch_size=train.micro_batch_size * world.size * data_parallel)


class PolicyObjective(nn.Module):
    def __init__(self, model: NemotronH):
        super().__init__()
        self.model = model
        if model.mtp is not None:  # no gradient reaches it: frozen, it stays out of the optimizer and DDP's buckets
            model.mtp.requires_grad_(False)
        self.main_moes, _ = moe_layers(model)
        self.mtp_moes: list = []
        self.mtp_depths = 0
        config = model.config
        self.moe_names = [f"{i}" for i, kind in enumerate(config.main_pattern) if kind == "E"]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, seq_idx: torch.Tensor, sampling: Sampling
                ) -> dict:
        h = self.model.model(input_ids, seq_idx=seq_idx)
        keep = targets != IGNORE
        logp, entropy = linear_logprobs(h[keep], self.model.lm_head.weight, targets[keep], sampling.temperature,
                                        sampling.top_k, sampling.top_p)
        loads = [expert_load(moe.last_routing[1], moe.gate.weight.shape[0]) for moe in self.main_moes
                 if moe.last_routing is not None]
        return {"logp": logp, "entropy": entropy,
                "expert_load": torch.stack(loads) if loads else h.new_zeros(0, 0)}


def reference_logprobs(reference: PolicyObjective, micro_batch: PolicyMicroBatch, sampling: Sampling
                       ) -> torch.Tensor:
    """The frozen reference policy's log-probs of a micro-batch's target tokens, under its whole distribution at the
    sampling temperature: the KL term pulls toward the reference, which samples nothing, and its top-k / top-p
    truncation would give -inf (an infinite KL) to every token the policy samples outside the reference's nucleus."""
    with torch.no_grad():
        return reference(micro_batch.input_ids, micro_batch.targets, micro_batch.seq_idx,
                         Sampling(sampling.temperature))["logp"]


@torch.no_grad()
def learner_logprobs(objective: nn.Module, micro_batches: list[PolicyMicroBatch], sampling: Sampling, compute: str,
                     world: World) -> None:
    """Fill each micro-batch's old_logp with the current weights' log-probs (before a batch's first update, when it
    takes several)."""
    for mb in micro_batches:
        with distributed.autocast(compute, world):
            out = objective(mb.input_ids.to(world.device), mb.targets.to(world.device), mb.seq_idx.to(world.device),
                            sampling)
        old = torch.zeros_like(mb.advantages)
        old[mb.targets != IGNORE] = out["logp"].float().cpu()
        mb.old_logp = old


def accumulate_policy_gradients(
    objective: nn.Module, micro_batches: list[PolicyMicroBatch], sampling: Sampling, losses: PolicyLossSettings,
    compute: str, world: World, reference: PolicyObjective | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Forward and backward of this rank's micro-batches (every rank the same number). Returns the step's statistics
    over the global batch (means over its trained tokens: entropy, clip fractions, ratio, mismatch, KL; ratio_max)
    and the expert load per MoE layer."""
    sums: dict[str, torch.Tensor] = {}
    ratio_max, load = torch.zeros((), device=world.device), 0
    if not micro_batches:
        raise ValueError("every rank runs at least one micro-batch (an empty one when it has no rows)")
    for i, mb in enumerate(micro_batches):
        mb = _on(mb, world.device)
        with distributed.gradient_sync(objective, sync=i == len(micro_batches) - 1):
            with distributed.autocast(compute, world):
                out = objective(mb.input_ids, mb.targets, mb.seq_idx, sampling)
            logp = out["logp"]
            old = logp.detach() if mb.old_logp is None else mb.gather(mb.old_logp)
            ref = reference_logprobs(reference, mb, sampling) if reference is not None else None
            advantages = mb.gather(mb.advantages)
            if mb.teacher_logp is not None:  # distillation: A_t = sg[log pi_teacher - log pi_prox]
                teacher = mb.gather(mb.teacher_logp)
                advantages = advantages + teacher - old
            # Data-parallel wrappers average gradients over ranks: multiply by the world to keep the global sum.
            loss, step_sums = clipped_policy_loss(
                logp, old, advantages, mb.gather(mb.weights) * world.size, losses.clip_low, losses.clip_high,
                mb.gather(mb.behaviour_logp), losses.tis_cap, ref, losses.kl_coeff, losses.tis_mode,
            )
            if mb.teacher_logp is not None:
                step_sums["reverse_kl"] = (old - teacher).sum().detach().float()
            loss.backward()
        step_sums["entropy"] = out["entropy"].sum()
        step_sums["loss"] = loss.detach() / world.size
        ratio_max = torch.maximum(ratio_max, step_sums.pop("ratio_max").to(ratio_max))
        for key, value in step_sums.items():
            sums[key] = sums.get(key, 0) + value.to(world.device)
        load = load + out["expert_load"]
    distributed.reduce_output_gradients(objective, world)
    keys = sorted(sums)
    stats = dict(zip(keys, world.all_reduce(torch.stack([sums[k] for k in keys])).tolist()))
    load = world.all_reduce(load)
    tokens = max(1.0, stats.pop("tokens", 0.0))
    means = {key: value / tokens for key, value in stats.items() if key != "loss"}
    return means | {"loss": stats.get("loss", 0.0), "ratio_max": world.max(ratio_max.item()), "tokens": tokens}, load


def _on(mb: PolicyMicroBatch, device: torch.device) -> PolicyMicroBatch:
    fields = {name: None if value is None else value.to(device) for name, value in vars(mb).items()}
    return PolicyMicroBatch(**fields)
