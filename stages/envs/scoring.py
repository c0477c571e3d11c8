"""Score a file of completions in one environment, row by row, as training would: how a reward function is debugged
(`n3 rlvr score`).

    results = score_file(load_environment("code"), Path("replies.jsonl"), workers=4)
    summarize(results)                                   # Summary(rows, mean_reward, passed, errors)

A row holds the environment's fields and a "completion": {"answer", "completion"} for math, {"tests",
"completion"} for code, {"instructions", "completion"} for instructions (a "prompt" may be there too); a user
class's score() gets the row without its completion as data.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from stages.envs.environments import DomainEnvironment, Environment, domain_data, read_rows, require


@dataclass
class RowScore:
    row: int
    """The row's position in the file, from 1."""
    reward: float
    passed: bool
    reason: str
    error: bool
    """The checker failed, not the completion: training drops such a sample."""
    seconds: float


@dataclass
class Summary:
    rows: int
    mean_reward: float
    """Over the rows scored: those whose checker failed are left out, as training leaves them out."""
    passed: int
    errors: int


def score_file(env: Environment, path: Path, workers: int = 4) -> list[RowScore]:
    """Every row of `path` scored in `env`, `workers` at a time (code runs programs), in file order. Every row is
    checked before any is scored: a bad one is a UserError naming the file and line."""
    jobs = []
    for where, row in read_rows(path):
        require(row, where, ("completion",), "a row to score")
        completion = row["completion"]
        if not isinstance(completion, str):
            raise UserError(f"{where}: 'completion' is a string, got {type(completion).__name__}")
        if isinstance(env, DomainEnvironment):
            data = domain_data(env.task, row, where)
        else:
            data = {field: value for field, value in row.items() if field != "completion"}
        jobs.append((data, completion))

    def timed(job: tuple[dict, str]):
        start = time.perf_counter()
        return env.score(*job), time.perf_counter() - start

    with ThreadPoolExecutor(workers) as pool:
        scored = list(pool.map(timed, jobs))
    return [RowScore(i, s.reward, s.passed, s.reason, s.error, seconds) for i, (s, seconds) in enumerate(scored, 1)]


def summarize(results: list[RowScore]) -> Summary:
    scored = [r for r in results if not r.error]
    mean = sum(r.reward for r in scored) / len(scored) if scored else 0.0
    return Summary(len(results), mean, sum(r.passed for r in scored), len(results) - len(scored))
