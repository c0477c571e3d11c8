"""What every verifiable task shares: the Problem and Score records, the Task interface, the train/test split and
the seeded drawing of problems.

A level's problems are the numbered combinations of a few choice lists (a Space). Drawing walks a seeded random
permutation of those numbers and keeps a problem only when `split_of(problem.key)` is the split asked for, so the
test split is disjoint from training by construction, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
"""The share of problem keys that belong to the test split."""


@dataclass(frozen=True)
class Problem:
    domain: str
    """"math", "code" or "instructions"."""
    level: int
    """Difficulty, 1 = easiest."""
    prompt: str
    """The user message."""
    reasoning: str
    """A worked reasoning trace: the assistant's reasoning_content in SFT data."""
    response: str
    """The reference answer (the assistant's content); it scores 1.0 with the domain's checker."""
    data: dict
    """What scoring needs, JSON-serialisable, in the form user data files use too."""
    key: str
    """The problem's identity: it decides the split, and two problems with equal keys are the same problem."""

    def messages(self, reasoning: bool = True) -> list[dict]:
        """The problem as a chat: the prompt and the reference answer, with its reasoning unless `reasoning` is off."""
        answer = {"role": "assistant", "content": self.response}
        if reasoning:
            answer = {"role": "assistant", "reasoning_content": self.reasoning, "content": self.response}
        return [{"role": "user", "content": self.prompt}, answer]


@dataclass
class Score:
    reward: float
    """In [0, 1]."""
    passed: bool
    reason: str
    """One short line: "correct", "no \\boxed{} answer", "test 2 failed: AssertionError", ..."""
    error: bool = False
    """The checker or the program runner failed, not the answer: drop the sample, never score it 0."""
    seconds: float = 0.0


class Task(Protocol):
    name: str
    levels: tuple[int, ...]

    def problems(self, split: str, count: int, seed: int, levels: Sequence[int] | None = None) -> list[Problem]:
        """`count` problems of `split` ("train" or "test"), deterministic in the arguments, levels taken in turn
        (None: all). Keys are distinct while the split's space allows; then train repeats and test returns fewer."""

    def score(self, data: dict, completion: str) -> Score:
        """Score the assistant's final answer text (reasoning already separated) against a problem's `data`."""


def split_of(key: str) -> str:
    """The split a key belongs to: "test" for a fixed TEST_FRACTION of keys, chosen by a stable hash, else "train"."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


@dataclass(frozen=True)
class Space:
    """A level's problems: every combination of one element from each of `choices`, numbered; `build` makes the
    Problem a combination names, or None where it names none (a subtraction below zero, a clashing pair of rules)."""

    choices: tuple[Sequence, ...]
    build: Callable[..., Problem | None]

    def __len__(self) -> int:
        return math.prod(len(options) for options in self.choices)

    def __getitem__(self, index: int) -> Problem | None:
        picked = []
        for options in reversed(self.choices):
            index, position = divmod(index, len(options))
            picked.append(options[position])
        return self.build(*reversed(picked))


class GeneratedTask:
    """problems() for a Task whose levels are Spaces: a domain subclasses it, sets `name` and `spaces` (level ->
    Space) and writes score()."""

    name: str
    spaces: Mapping[int, Space]

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(self.spaces)

    def problems(self, split: str, count: int, seed: int, levels: Sequence[int] | None = None) -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        wanted = list(dict.fromkeys(self.levels if levels is None else levels))
        if not wanted or any(level not in self.spaces for level in wanted):
            raise ValueError(f"{self.name} has levels {', '.join(map(str, self.levels))}; got {wanted}")
        # One stream per level, seeded apart (a str seed is hashed with sha512: the same in every process), so
        # asking for more problems extends the list rather than reshuffling it.
        streams = {
            level: _split_problems(self.spaces[level], split, random.Random(f"{self.name}/{split}/{seed}/{level}"))
            for level in wanted
        }
        problems: list[Problem] = []
        while streams and len(problems) < count:
            for level in list(streams):
                if len(problems) == count:
                    break
                problem = next(streams[level], None)
                if problem is None:
                    del streams[level]
                else:
                    problems.append(problem)
        return problems


def _split_problems(space: Space, split: str, rng: random.Random) -> Iterator[Problem]:
    """The space's problems of `split`, each key once in random order; for train, then again in a new order."""
    while True:
        seen: set[str] = set()
        for index in _permutation(len(space), rng):
            problem = space[index]
            if problem is not None and problem.key not in seen and split_of(problem.key) == split:
                seen.add(problem.key)
                yield problem
        if split == "test" or not seen:
            return


def _permutation(size: int, rng: random.Random) -> Iterator[int]:
    """Each of range(size) once, in random order; lazy, so a huge space costs only what is drawn from it."""
    seen: set[int] = set()
    while 2 * len(seen) < size:
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index
    rest = [index for index in range(size) if index not in seen]
    rng.shuffle(rest)
    yield from rest
