"""From task generators to prompts of a target length, measured in the model's tokens as RULER measures them:
prompt tokens + the task's generation length <= the target.

The filler size is searched once per task and length (doubling, then bisection, on a probe sample), then each sample
is built at that size and shrunk in 1% steps in the rare case its own random content runs over. Every sample draws
from its own random generator, seeded by (seed, task, length, index): a sample does not depend on which other tasks,
lengths or samples run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from model.errors import UserError
from stages.eval.ruler.draft import Draft, Generator


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: list[int]
    """The token ids sent to the model."""
    text: str
    """The prompt as text."""
    answers: list[str]
    max_tokens: int
    meta: dict


def compose(draft: Draft, chat: Callable[[list[dict]], str] | None) -> str:
    """The prompt text: the task then its answer prefix, or with `chat` (a renderer of the model's chat template,
    generation prompt on, reasoning off) the task as a user turn and the answer prefix opening the assistant's turn."""
    if chat is None:
        return draft.text + draft.answer_prefix
    return chat([{"role": "user", "content": draft.text}]) + draft.answer_prefix.lstrip()


def fit(measure: Callable[[int], int], budget: int, limit: int | None) -> int:
    """The largest n in [0, limit] with measure(n) <= budget, for a measure that grows with n; -1 if none."""
    if measure(0) > budget:
        return -1
    good, bad = 0, None
    n = 16
    while bad is None:
        if limit is not None and n >= limit:
            if measure(limit) <= budget:
                return limit
            bad = limit
        elif measure(n) <= budget:
            good, n = n, 2 * n
        else:
            bad = n
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if measure(middle) <= budget else (good, middle)
    return good


def task_samples(
    task: str, generator: Generator, tokens_to_generate: int, length: int, count: int, seed: int,
    encode: Callable[[str], list[int]], chat: Callable[[list[dict]], str] | None,
) -> Iterator[Sample]:
    budget = length - tokens_to_generate

    def build(n: int, index: int) -> tuple[Draft, str, list[int]]:
        draft = generator.make(n, random.Random(f"{seed}/{task}/{length}/{index}"), index)
        text = compose(draft, chat)
        return draft, text, encode(text)

    size = fit(lambda n: len(build(n, 0)[2]), budget, generator.max_units)
    if size < 0:
        need = len(build(0, 0)[2]) + tokens_to_generate
        raise UserError(f"length {length} is too short for {task}: its prompt alone needs about {need} tokens")
    for index in range(count):
        n = size
        draft, text, ids = build(n, index)
        while len(ids) > budget and n > 0:
            n = max(0, n - max(1, n // 100))
            draft, text, ids = build(n, index)
        if len(ids) > budget:
            raise UserError(f"length {length} is too short for {task} (sample {index} needs {len(ids)} tokens)")
        yield Sample(task, length, index, ids, text, draft.answers, tokens_to_generate, draft.meta)
