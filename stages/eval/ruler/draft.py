"""What a task generator produces: one prompt's task text, answer prefix and references, before the length fit."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class Draft:
    text: str
    """The task template filled in (the user's turn, in chat mode)."""
    answer_prefix: str
    """Appended after the text (after the assistant header, in chat mode): the start of the model's answer."""
    answers: list[str]
    meta: dict = field(default_factory=dict)
    """Facts a report or a test can check, e.g. the depth of each needle."""


class Generator(ABC):
    """Makes a task's prompts at a given size: n units of filler (words, sentences, list entries, documents). The
    sampler searches n so that the prompt fills the target length."""

    max_units: int | None = None
    """The most filler the source holds (None: unbounded, e.g. a repeated haystack)."""

    @abstractmethod
    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        """The prompt of sample `index` with n units of filler; everything random comes from rng."""
