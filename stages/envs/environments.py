"""Verifiable environments behind one interface: what RLVR draws prompts from and scores replies with.

    envs = load_environments(["math:1-2", "code=tests.jsonl", "mypkg.envs:Judge"], weights=[2, 1, 1])
    prompts = blend_prompts(envs, [2, 1, 1], 512, "train", seed=0)     # shares 256 / 128 / 128, in a seeded order
    envs[prompts[0].env].score(prompts[0].data, completion)           # Score(reward, passed, reason, error, seconds)

An environment spec is one of:
    DOMAIN[:LEVELS]       a built-in task's generated problems ("math", "code:3-4"; levels as in `n3 eval tasks`)
    DOMAIN=FILE           your rows, scored by that domain's checker (FileEnvironment says what a row holds)
    package.module:Class  your class, imported with the current directory on sys.path and made without arguments;
                          it has a `name`, `prompts(split, count, seed)` returning Prompts of that name, and
                          `score(data, completion)` returning a Score

An environment is named by its domain or its class's `name`; the names in a blend are distinct, and weights go in
the order of the specs. Bad specs and bad rows are UserErrors that name the spec, or the file and line.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from model.errors import UserError
from stages.chat.sources import file_rows
from stages.envs import TASKS
from stages.envs.base import SPLITS, Score, Task, split_of
from stages.envs.code import CodeTask
from stages.envs.sandbox import Runner
from stages.envs.suite import parse_suite


@dataclass(frozen=True)
class Prompt:
    env: str
    """The name of the environment that scores replies to it."""
    messages: list[dict]
    """The conversation to answer: a user turn, after a system turn where the environment has one."""
    data: dict
    """What the environment's score() needs, JSON-serialisable."""
    key: str
    """The prompt's identity: equal keys are the same prompt, and the key decides a file row's split."""


class Environment(Protocol):
    name: str

    def prompts(self, split: str, count: int, seed: int) -> list[Prompt]:
        """`count` prompts of `split` ("train" or "test"), deterministic in the arguments; no test prompt is ever a
        train prompt. Train repeats its prompts when it runs out; test returns fewer."""

    def score(self, data: dict, completion: str) -> Score:
        """Score the final answer (reasoning already separated) against a prompt's data: reward in [0, 1];
        error=True when the checker failed rather than the answer (the trainer drops the sample)."""


class DomainEnvironment:
    """What the built-in and the file environments share: a domain's checker, under the domain's name; code runs
    its programs through `runner` where one is given (the sandbox's isolation and concurrency)."""

    def __init__(self, domain: str, runner: Runner | None = None):
        self.name = domain
        self.task: Task = CodeTask(runner) if domain == "code" and runner is not None else TASKS[domain]

    def score(self, data: dict, completion: str) -> Score:
        return self.task.score(data, completion)


class TaskEnvironment(DomainEnvironment):
    """A built-in task's generated problems at the chosen levels (None: all)."""

    def __init__(self, domain: str, levels: list[int] | None = None, runner: Runner | None = None):
        super().__init__(domain, runner)
        self.levels = levels

    def prompts(self, split: str, count: int, seed: int) -> list[Prompt]:
        return [Prompt(self.name, [{"role": "user", "content": p.prompt}], p.data, p.key)
                for p in self.task.problems(split, count, seed, self.levels)]


FIELDS = {"math": ("answer",), "code": ("tests",), "instructions": ("instructions",)}
"""The fields of a user row that each domain's checker scores with."""


class FileEnvironment(DomainEnvironment):
    """Rows from a .jsonl file (or .json, .parquet), scored by a domain's checker:
        math          {"prompt", "answer"}                        answer: a number or a LaTeX string
        code          {"prompt", "tests": ["assert f(1) == 2", ...]} run after the reply's last ```python block
        instructions  {"prompt", "instructions": [{"id", "kwargs"}, ...]}   ids as in stages/envs/instructions.py
    each with an optional "system" message; other fields are ignored. A row is held out of training when
    `split_of(prompt)` is "test" (a fifth of the prompts, the same ones on every run); with hold_out off, every row
    trains and the test split is empty."""

    def __init__(self, domain: str, path: Path, hold_out: bool = True, runner: Runner | None = None):
        super().__init__(domain, runner)
        self.path = path
        self.rows: dict[str, list[Prompt]] = {split: [] for split in SPLITS}
        for where, row in read_rows(path):
            require(row, where, ("prompt", *FIELDS[domain]), f"a {domain} row")
            prompt, system = row["prompt"], row.get("system", "")
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{where}: 'prompt' is a non-empty string, got {_short(repr(prompt))}")
            if not isinstance(system, str):
                raise UserError(f"{where}: 'system' is a string, got {type(system).__name__}")
            messages = [{"role": "system", "content": system}] if system else []
            prompt_row = Prompt(domain, [*messages, {"role": "user", "content": prompt}],
                                domain_data(self.task, row, where), key=prompt)
            self.rows[split_of(prompt) if hold_out else "train"].append(prompt_row)

    def prompts(self, split: str, count: int, seed: int) -> list[Prompt]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        rows, rng, prompts = self.rows[split], random.Random(f"{self.name}/{split}/{seed}"), []
        while rows and len(prompts) < count:  # each pass a new order, as the built-in tasks repeat
            order = rng.sample(rows, len(rows))
            prompts += order[: count - len(prompts)]
            if split == "test":
                break
        return prompts


class ClassEnvironment:
    """A user's class, `package.module:Class`, held to the interface: a score() that raises is a checker failure
    (error=True, the sample dropped); prompts that are not this environment's Prompts, or a score that is not a
    Score with a reward in [0, 1], are errors in the class."""

    def __init__(self, spec: str):
        module_name, _, class_name = spec.partition(":")
        if os.getcwd() not in sys.path:  # as `python -m` would: modules beside the user are found
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # whatever the module raises while importing is the user's to fix
            raise UserError(f"environment {spec}: cannot import {module_name} ({type(err).__name__}: {err})") from err
        made = getattr(module, class_name, None)
        if not callable(made):
            raise UserError(f"environment {spec}: {module_name} has no class {class_name}")
        try:
            env = made()
        except Exception as err:
            raise UserError(f"environment {spec}: {class_name}() failed ({type(err).__name__}: {err}); an "
                            "environment class is made without arguments") from err
        name = getattr(env, "name", None)
        missing = [] if isinstance(name, str) and name else ["a name (a non-empty str)"]
        missing += [f"a {method}() method" for method in ("prompts", "score") if not callable(getattr(env, method, None))]
        if missing:
            raise UserError(f"environment {spec}: {class_name} does not implement the Environment interface "
                            f"(stages/envs/environments.py): it lacks {' and '.join(missing)}")
        self.spec, self.env, self.name = spec, env, name

    def prompts(self, split: str, count: int, seed: int) -> list[Prompt]:
        prompts = list(self.env.prompts(split, count, seed))
        wrong = next((p for p in prompts if not isinstance(p, Prompt) or p.env != self.name), None)
        if wrong is not None:
            raise UserError(f"environment {self.spec}: prompts() returns Prompts whose env is {self.name!r}; got "
                            f"{_short(repr(wrong))}")
        return prompts

    def score(self, data: dict, completion: str) -> Score:
        start = time.perf_counter()
        try:
            score = self.env.score(data, completion)
        except UserError:
            raise
        except Exception as err:  # the checker crashed, not the answer: the sample is dropped, never scored 0
            return Score(0.0, False, f"checker failed: {type(err).__name__}: {_short(str(err))}", error=True,
                         seconds=time.perf_counter() - start)
        if not isinstance(score, Score) or not 0.0 <= score.reward <= 1.0:
            raise UserError(f"environment {self.spec}: score() returns a Score with a reward in [0, 1]; got "
                            f"{_short(repr(score))}")
        return score


def load_environment(spec: str, hold_out: bool = True, runner: Runner | None = None) -> Environment:
    """The environment a spec names (the module docstring lists the forms); `hold_out` as in FileEnvironment,
    `runner` as in DomainEnvironment."""
    domain, eq, path = spec.partition("=")
    if eq:
        if domain not in TASKS:
            raise UserError(f"environment {spec!r}: DOMAIN=FILE scores the rows with a domain's checker, one of "
                            f"{', '.join(TASKS)}")
        return FileEnvironment(domain, Path(path).expanduser(), hold_out, runner)
    module, colon, attr = spec.partition(":")
    if colon and attr.isidentifier():
        return ClassEnvironment(spec)
    if module not in TASKS:
        raise UserError(f"unknown environment {spec!r}: give a built-in one ({', '.join(TASKS)}, levels as in "
                        "math:1-2), DOMAIN=FILE.jsonl or package.module:Class")
    (levels,) = parse_suite([spec]).values()
    return TaskEnvironment(module, levels, runner)


def load_environments(specs: Sequence[str], weights: Sequence[float] = (), hold_out: bool = True,
                      runner: Runner | None = None) -> dict[str, Environment]:
    """The environments of a blend, by name, in the order of `specs`; `weights` (one per spec, or none) checked."""
    envs: dict[str, Environment] = {}
    for spec in specs:
        env = load_environment(spec, hold_out, runner)
        if env.name in envs:
            raise UserError(f"environment {spec!r}: another environment is named {env.name!r} too; each "
                            "environment of a blend needs its own name")
        envs[env.name] = env
    if not envs:
        raise UserError("no environments given")
    check_weights(envs, weights)
    return envs


def with_preset_levels(specs: Sequence[str], preset: Sequence[str]) -> list[str]:
    """Specs given on the command line, a bare built-in domain ("math") taking the levels the preset's own list
    gives it ("math:1-2"), so that a single-domain run trains on what the preset's blend does."""
    levels = {spec.partition(":")[0]: spec for spec in preset if ":" in spec and spec.partition(":")[0] in TASKS}
    return [levels.get(spec, spec) for spec in specs]


def check_weights(envs: Mapping[str, Environment], weights: Sequence[float]) -> list[float]:
    """One positive weight per environment, in order; none given: all equal."""
    if not weights:
        return [1.0] * len(envs)
    if len(weights) != len(envs):
        raise UserError(f"{len(weights)} weights for {len(envs)} environments ({', '.join(envs)}): give one each, "
                        "in the same order")
    if not all(weight > 0 for weight in weights):
        raise UserError(f"environment weights must be positive, got {list(weights)}")
    return [float(weight) for weight in weights]


def weights_by_name(envs: Mapping[str, Environment], named: Mapping[str, float]) -> list[float]:
    """`--weight NAME=W` options as weights in the order of `envs`; an environment not named weighs 1."""
    for name in named:
        if name not in envs:
            raise UserError(f"--weight {name}: no environment is named {name!r} ({', '.join(envs)})")
    return [named.get(name, 1.0) for name in envs]


def blend_prompts(envs: Mapping[str, Environment], weights: Sequence[float], count: int, split: str, seed: int
                  ) -> list[Prompt]:
    """`count` prompts of `split`, each environment's share in proportion to its weight (shares rounded by largest
    remainder, so they sum to count), shuffled together, deterministic in the arguments. A test split that runs
    out gives fewer."""
    shares = _shares(check_weights(envs, weights), count)
    prompts = [prompt for env, share in zip(envs.values(), shares) if share for prompt in env.prompts(split, share, seed)]
    random.Random(f"blend/{split}/{seed}").shuffle(prompts)
    return prompts


def stage_seed(stage: str, seed: int) -> int:
    """A stage's own seed for drawing training prompts. `n3 sft` draws the built-in tasks' problems with the run seed
    itself; a later stage that draws with this one trains on problems SFT did not, where a task's space holds more
    than SFT drew (RL on the very problems SFT fitted teaches the held-out ones little)."""
    return zlib.crc32(f"{stage}/{seed}".encode())


def _shares(weights: list[float], count: int) -> list[int]:
    exact = [count * weight / sum(weights) for weight in weights]
    shares = [math.floor(share) for share in exact]
    largest_remainder_first = sorted(range(len(weights)), key=lambda i: shares[i] - exact[i])
    for i in largest_remainder_first[: count - sum(shares)]:
        shares[i] += 1
    return shares


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every row of a user file, `where` naming the file and line; a missing file, a line that is
    not JSON, or a row that is not an object is a UserError."""
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"{path}: give rows as .jsonl (one JSON object a line), .json or .parquet")
    rows = []
    for where, row in file_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row is a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def require(row: dict, where: str, fields: Sequence[str], what: str) -> None:
    """A UserError naming `where` unless the row has every field."""
    missing = [field for field in fields if field not in row]
    if missing:
        raise UserError(f"{where}: {what} needs {_names(fields)}; this one has no {_names(missing)}")


def domain_data(task: Task, row: dict, where: str) -> dict:
    """The fields of a user row that `task`'s checker scores with, checked by the checker itself: each checks its
    data before it reads the answer, so scoring an empty answer checks a row and runs nothing."""
    require(row, where, FIELDS[task.name], f"a {task.name} row")
    data = {field: row[field] for field in FIELDS[task.name]}
    try:
        task.score(data, "")
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    return data


def _names(fields: Sequence[str]) -> str:
    quoted = [f"'{field}'" for field in fields]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
