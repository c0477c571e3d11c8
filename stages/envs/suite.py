"""A suite of the built-in tasks: the domains and levels a config names ("math", "code:1-2"), their problems, and a
model's accuracy on held-out problems, greedy, with reasoning on and off (what `n3 eval tasks` reports and what
`n3 sft` compares before and after).

    suite = parse_suite(["math:1-2", "code"])                  # {"math": [1, 2], "code": None}
    problems = suite_problems(suite, "test", 100, seed=0)      # {"math": [...], "code": [...]}
    result = evaluate_suite(backend, problems, max_tokens=256)  # SuiteAccuracy
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.errors import UserError
from presets.schema import RunConfig
from stages.envs import TASKS, Problem
from stages.rollout.backend import Backend, engine_backend
from stages.runtime.files import write_json
from stages.runtime.progress import Progress

MODES = {"on": True, "off": False}
"""Reasoning modes: the value of the chat template's enable_thinking."""
_LEVELS = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_suite(specs: list[str]) -> dict[str, list[int] | None]:
    """DOMAIN or DOMAIN:LEVELS (a level, or a range such as 1-3) -> {domain: levels, None for all}."""
    suite: dict[str, list[int] | None] = {}
    for spec in specs:
        domain, _, levels = spec.partition(":")
        if domain not in TASKS:
            raise UserError(f"unknown task {domain!r} in {spec!r}; the built-in tasks are {', '.join(TASKS)}")
        match = _LEVELS.match(levels) if levels else None
        if levels and not match:
            raise UserError(f"task {spec!r}: give levels as a number or a range, e.g. {domain}:1-2")
        chosen = list(range(int(match[1]), int(match[2] or match[1]) + 1)) if match else None
        known = TASKS[domain].levels
        if chosen is not None and (not chosen or any(level not in known for level in chosen)):
            raise UserError(f"task {spec!r}: {domain} has levels {', '.join(map(str, known))}")
        suite[domain] = chosen
    if not suite:
        raise UserError("no tasks chosen")
    return suite


def suite_problems(suite: dict[str, list[int] | None], split: str, count: int, seed: int) -> dict[str, list[Problem]]:
    """`count` problems of each domain's levels from `split` ("train" or "test")."""
    return {domain: TASKS[domain].problems(split, count, seed, levels) for domain, levels in suite.items()}


@dataclass
class DomainAccuracy:
    domain: str
    reasoning: str
    """"on" or "off"."""
    problems: int
    """Problems scored (those whose checker failed are left out and counted in `errors`)."""
    passed: int
    reward: float
    """Mean reward (partial credit, e.g. the share of instructions followed)."""
    tokens: float
    """Mean tokens of a reply, reasoning included."""
    errors: int = 0

    @property
    def accuracy(self) -> float:
        return self.passed / self.problems if self.problems else 0.0


@dataclass
class SuiteAccuracy:
    backend: str
    results: list[DomainAccuracy]
    predictions: list[dict] = field(default_factory=list)
    """One per problem and mode: domain, level, mode, prompt, reasoning, answer, reward, passed, reason, tokens."""

    def get(self, domain: str, reasoning: str) -> DomainAccuracy | None:
        return next((r for r in self.results if (r.domain, r.reasoning) == (domain, reasoning)), None)

    def summary(self) -> dict:
        return {"backend": self.backend,
                "results": [asdict(r) | {"accuracy": r.accuracy} for r in self.results]}

    @classmethod
    def from_summary(cls, summary: dict) -> SuiteAccuracy:
        """Back from `summary()` (the predictions are not in it)."""
        results = [DomainAccuracy(**{k: v for k, v in r.items() if k != "accuracy"}) for r in summary["results"]]
        return cls(summary["backend"], results)


def evaluate_suite(
    backend: Backend, problems: dict[str, list[Problem]], max_tokens: int, modes: tuple[str, ...] = ("on", "off"),
    advance: Callable[[int], None] | None = None,
) -> SuiteAccuracy:
    """Greedy replies to every problem in every reasoning mode, scored by the domains' checkers (reasoning apart:
    only the answer after it counts). `advance(n)` hears each batch of replies."""
    results, predictions = [], []
    with ThreadPoolExecutor(4) as pool:  # code problems run programs: score several at once
        for domain, items in problems.items():
            for mode in modes:
                conversations = [[{"role": "user", "content": p.prompt}] for p in items]
                replies = backend.chat(conversations, max_tokens, enable_thinking=MODES[mode])
                scores = list(pool.map(TASKS[domain].score, [p.data for p in items], [r.content for r in replies]))
                if advance is not None:
                    advance(len(items))
                kept = [(p, r, s) for p, r, s in zip(items, replies, scores) if not s.error]
                results.append(DomainAccuracy(
                    domain, mode, len(kept), sum(s.passed for _, _, s in kept),
                    sum(s.reward for _, _, s in kept) / max(1, len(kept)),
                    sum(r.tokens for _, r, _ in kept) / max(1, len(kept)), errors=len(items) - len(kept),
                ))
                predictions += [{"domain": domain, "level": p.level, "reasoning_mode": mode, "prompt": p.prompt,
                                 "reasoning": r.reasoning, "answer": r.content, "tokens": r.tokens,
                                 "reward": s.reward, "passed": s.passed, "reason": s.reason, "error": s.error}
                                for p, r, s in zip(items, replies, scores)]
    return SuiteAccuracy(backend.description, results, predictions)


def checkpoint_accuracy(
    cfg: RunConfig, checkpoint: Path, suite: dict[str, list[int] | None], count: int, max_tokens: int, seed: int,
    progress: Progress, title: str, modes: tuple[str, ...] = ("on", "off"),
) -> SuiteAccuracy:
    """Held-out accuracy of a checkpoint on `count` test problems per domain of the suite, in an in-process engine
    that decodes eagerly (compiling costs more than these few replies): what stages report before and after."""
    problems = suite_problems(suite, "test", count, seed)
    backend = engine_backend(checkpoint, cfg, progress.note, max_batch=32, compile=False)
    progress.start(title, total=len(modes) * sum(map(len, problems.values())))
    return evaluate_suite(backend, problems, max_tokens, modes, progress.advance)


def accuracy_before(
    cfg: RunConfig, run: Path, start: Path, suite: dict[str, list[int] | None], resume: bool, count: int,
    max_tokens: int, seed: int, progress: Progress, title: str,
) -> SuiteAccuracy:
    """The starting checkpoint's held-out accuracy: measured once, kept in the run folder (tasks-before.json) for
    --resume."""
    saved = run / "tasks-before.json"
    if resume and saved.is_file():
        return SuiteAccuracy.from_summary(json.loads(saved.read_text()))
    before = checkpoint_accuracy(cfg, start, suite, count, max_tokens, seed, progress, title)
    write_json(saved, before.summary())
    return before
