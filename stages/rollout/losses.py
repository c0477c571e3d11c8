"""Policy losses as pure functions of per-token log-probabilities, advantages and weights (REFERENCE.md section 4).

Tokens arrive flattened: every trained token of the step's sequences (a rank's micro-batch), with
- `logp`: log pi_theta of the sampled token, differentiable (kernels.logprobs under the sampling distribution);
- `old_logp`: log pi_old, the policy that the ratio is taken against: the learner's weights before this rollout
  batch's first update (equal to logp.detach() for the one on-policy step per batch);
- `behaviour_logp`: the rollout engine's log-probs of the same tokens (what was actually sampled from);
- `weights`: each token's share of the global batch's loss, set by the normalisation (token_weights).

GRPO family: advantages per group of samples of one prompt (group_advantages); the PPO clipped objective with an
asymmetric clip (DAPO's clip-higher); optional KL to a frozen reference with the k3 estimator; truncated importance
sampling (TIS) against the engine's log-probs, min(pi_old / pi_behaviour, cap), for the mismatch between the engine
and the learner. Every function returns sums, so a caller adds micro-batches and ranks before dividing.
"""

from __future__ import annotations

import torch

ADVANTAGES = ("grpo", "dr_grpo", "loo")
"""(r - mean) / (std + eps) per group; r - mean (Dr. GRPO); leave-one-out, r - mean of the others (NeMo-RL)."""
NORMALISATIONS = ("token", "sequence")
"""Token-mean over the global batch (DAPO, TRL `dapo`, verl `token-mean`), or the mean over sequences of each
sequence's token-mean (GRPO's original form)."""
TIS_MODES = ("cap", "mask")
"""How the behaviour correction meets its cap: truncated (TIS, AReaL) or the token left out of the loss."""


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards (n,) of one group's samples -> advantages (n,)."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {kind!r}")
    n = rewards.numel()
    centred = rewards - rewards.mean()
    if kind == "dr_grpo":
        return centred
    if kind == "loo":
        return centred * n / (n - 1) if n > 1 else torch.zeros_like(rewards)
    return centred / (rewards.std(unbiased=False) + eps)


def outcome_advantages(rewards: torch.Tensor, weight: float) -> torch.Tensor:
    """Outcome-reward mixing for distillation: weight x (r - mean) over one domain's samples of a step, added to
    every token's advantage beside the teacher's signal."""
    return weight * (rewards - rewards.mean()) if rewards.numel() else rewards


def token_weights(lengths: list[int], normalisation: str, global_tokens: int, global_sequences: int) -> torch.Tensor:
    """Each token's weight in the loss, flattened over sequences of `lengths` trained tokens: 1 / the global batch's
    tokens (token-mean), or 1 / (its sequence's tokens x the global batch's sequences) (sequence-mean)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    if normalisation == "token":
        return torch.full((sum(lengths),), 1.0 / max(1, global_tokens))
    return torch.cat([torch.full((n,), 1.0 / (max(1, n) * max(1, global_sequences))) for n in lengths]
                     or [torch.zeros(0)])


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then linearly down to -1 at max_tokens."""
    if buffer <= 0 or length <= max_tokens - buffer:
        return 0.0
    return max(-1.0, (max_tokens - buffer - length) / buffer)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
    clip_low: float = 0.2, clip_high: float = 0.28, behaviour_logp: torch.Tensor | None = None,
    tis_cap: float = 0.0, ref_logp: torch.Tensor | None = None, kl_coeff: float = 0.0, tis_mode: str = "cap",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum over tokens of -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) (x the behaviour
    correction c = pi_old / pi_behaviour when tis_cap > 0: min(c, tis_cap) with tis_mode "cap", or c where c <=
    tis_cap and 0 above with "mask") + kl_coeff x k3(ref || theta); r = exp(logp - old_logp). Returns (loss to
    backpropagate, sums): the sums (detached, over these tokens) of what the step's metrics are made of; divide by
    `tokens`."""
    if tis_mode not in TIS_MODES:
        raise ValueError(f"tis_mode must be one of {', '.join(TIS_MODES)}, got {tis_mode!r}")
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    per_token = -surrogate
    sums: dict[str, torch.Tensor] = {}
    if behaviour_logp is not None:
        gap = old_logp.detach() - behaviour_logp
        # NeMo-RL's token_mult_prob_error: 1 when the engine and the learner agree exactly.
        sums["token_mult_prob_error"] = gap.abs().exp().sum()
        sums["mismatch_kl"] = k3(gap).sum()  # KL(behaviour || learner) from the behaviour's samples
        if tis_cap > 0:
            correction = gap.exp()
            above = correction > tis_cap
            sums["behaviour_masked"] = above.sum().float()
            per_token = per_token * (correction.clamp(max=tis_cap) if tis_mode == "cap" else correction * ~above)
    if ref_logp is not None and kl_coeff > 0:
        kl = k3(ref_logp - logp)
        per_token = per_token + kl_coeff * kl
        sums["kl"] = kl.detach().sum()
    with torch.no_grad():
        sums["tokens"] = torch.tensor(float(logp.numel()))
        sums["clip_low"] = ((ratio < 1 - clip_low) & (advantages < 0)).sum().float()
        sums["clip_high"] = ((ratio > 1 + clip_high) & (advantages > 0)).sum().float()
        sums["ratio"] = ratio.sum()
        sums["ratio_max"] = ratio.max() if ratio.numel() else torch.tensor(0.0)
    return (per_token * weights).sum(), {k: v.detach().float() for k, v in sums.items()}


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(p || q) from samples of p, given log(q / p) per sample: exp(x) - x - 1 >= 0."""
    return torch.exp(log_ratio) - log_ratio - 1
