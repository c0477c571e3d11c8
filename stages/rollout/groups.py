"""From sampled replies to trajectories: score each reply in its environment, drop what the infrastructure failed
to score, shape the rewards, take advantages per group, keep the groups that carry a signal.

A Score with error=True (a sandbox that could not start, a checker that crashed) says nothing about the reply: the
sample leaves its group (the group's statistics come from the rest) and is counted, never scored 0. Groups whose
rewards are all equal carry no advantage and are dropped when `filter_zero_variance` (DAPO's dynamic sampling); the
dropped share is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from stages.envs.base import Score
from stages.rollout.backend import Rollout
from stages.rollout.batches import Trajectory
from stages.rollout.losses import group_advantages, overlong_penalty
from stages.runtime.distributed import World


@dataclass
class Scored:
    env: str
    group: int
    rollout: Rollout
    score: Score


@dataclass
class GroupSettings:
    advantage: str = "grpo"
    filter_zero_variance: bool = True
    overlong_buffer: int = 0
    max_tokens: int = 1024


MEANS = ("reward", "accuracy", "length")
"""What GroupStats.per_env sums and env_means divides by the samples."""


@dataclass
class GroupStats:
    groups: int = 0
    zero_variance: int = 0
    """Groups whose rewards were all equal."""
    errors: int = 0
    """Samples the infrastructure failed to score, dropped."""
    per_env: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per environment, summed over its samples: samples, reward (before shaping), passed, length (reply tokens);
    sums, so ranks add them (env_means divides)."""


def score_groups(
    score: Callable[[str, dict, str], Score], envs: Sequence[str], data: Sequence[dict],
    rollouts: Sequence[Sequence[Rollout]], workers: int,
) -> list[list[Scored]]:
    """Score every reply: group i holds the samples of prompt i (environment envs[i], its data[i]). `score(env, data,
    completion)` runs `workers` at a time (code runs programs)."""
    # A group's samples often repeat one another word for word (low entropy): each distinct answer is scored once.
    distinct = list(dict.fromkeys((i, rollout.content) for i, group in enumerate(rollouts) for rollout in group))
    with ThreadPoolExecutor(workers) as pool:
        scores = dict(zip(distinct, pool.map(lambda job: score(envs[job[0]], data[job[0]], job[1]), distinct)))
    return [[Scored(envs[i], i, rollout, scores[i, rollout.content]) for rollout in group]
            for i, group in enumerate(rollouts)]


def trajectories(groups: list[list[Scored]], settings: GroupSettings) -> tuple[list[Trajectory], GroupStats]:
    """The trajectories the update trains on, and what the groups looked like."""
    stats = GroupStats(groups=len(groups))
    kept: list[Trajectory] = []
    for group in groups:
        valid = [s for s in group if not s.score.error]
        stats.errors += len(group) - len(valid)
        _count(stats, valid)
        if len(valid) < 2:
            continue
        rewards = torch.tensor([s.score.reward + overlong_penalty(len(s.rollout.token_ids), settings.max_tokens,
                                                                  settings.overlong_buffer) for s in valid])
        if bool((rewards == rewards[0]).all()):
            stats.zero_variance += 1
            if settings.filter_zero_variance:
                continue
        for s, advantage in zip(valid, group_advantages(rewards, settings.advantage).tolist()):
            r = s.rollout
            kept.append(Trajectory(r.prompt_ids, r.token_ids, r.logprobs, [not f for f in r.forced], advantage,
                                   s.env, s.group))
    return kept, stats


def _count(stats: GroupStats, samples: list[Scored]) -> None:
    for s in samples:
        row = stats.per_env.setdefault(s.env, dict.fromkeys(("samples", *MEANS), 0.0))
        row["samples"] += 1
        row["reward"] += s.score.reward
        row["accuracy"] += float(s.score.passed)
        row["length"] += len(s.rollout.token_ids)


def env_means(per_env: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per environment, over several GroupStats.per_env (one per rank): the means over the samples of MEANS, and
    every other key (samples included) summed."""
    totals: dict[str, dict[str, float]] = {}
    for part in per_env:
        for env, row in part.items():
            into = totals.setdefault(env, {})
            for key, value in row.items():
                into[key] = into.get(key, 0.0) + value
    return {env: {key: value / max(1.0, row["samples"]) if key in MEANS else value for key, value in row.items()}
            for env, row in totals.items()}


def gather_env_means(per_env: dict[str, dict[str, float]], world: World) -> dict[str, dict[str, float]]:
    """env_means over every rank's GroupStats.per_env (collective under torchrun)."""
    return env_means(world.gather(per_env))
