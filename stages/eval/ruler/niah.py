"""Needle in a haystack (RULER `niah.py`): needles "One of the special magic {numbers|uuids} for {key} is: {value}."
hidden at depths spread over the haystack; the question asks for the values of one or more keys.

Haystacks: `noise` repeats one paragraph of filler sentences, `essay` is prose (split into sentences; needles go
between sentences), `needle` is distractor needles with other keys. Each needle sits at a depth drawn from 40 depths
evenly spaced over 0..100% (RULER's), placed at that fraction of the haystack's units.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import numpy as np

from stages.eval.corpus import Corpus, sentences
from stages.eval.ruler.draft import Draft, Generator
from stages.eval.ruler.tasks import FAMILIES
from stages.eval.ruler.words import WordLists

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]


def singular(template: str) -> str:
    """RULER's rewording of the niah template when one value is asked for."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


@dataclass
class Niah(Generator):
    haystack: str
    """noise | essay | needle"""
    key_kind: str
    """words | numbers | uuids"""
    value_kind: str
    keys: int
    values: int
    queries: int
    words: WordLists
    corpus: Corpus | None = None
    """The essay haystack's text (needed for haystack = essay)."""

    def draw(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return f"{rng.choice(self.words.adjectives)}-{rng.choice(self.words.nouns)}"

    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        keys: list[str] = []
        while len(keys) < max(self.keys, self.queries):
            key = self.draw(self.key_kind, rng)
            if key not in keys:
                keys.append(key)
        values = [[self.draw(self.value_kind, rng) for _ in range(self.values)] for _ in keys]
        needles = [NEEDLE.format(kind=self.value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        context = self.context(n, needles, depths, set(keys), rng)

        queried = rng.sample(range(len(keys)), self.queries)
        names = [keys[i] for i in queried]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        family = FAMILIES["niah"]
        template, prefix, kind = family.template, family.answer_prefix, self.value_kind
        if self.queries * self.values == 1:
            template, prefix, kind = singular(template), singular(prefix), kind[:-1]
        return Draft(
            text=template.format(type_needle_v=kind, context=context, query=query),
            answer_prefix=prefix.format(type_needle_v=kind, query=query),
            answers=[v for i in queried for v in values[i]],
            meta={"depths": depths, "needles": needles},
        )

    def context(self, n: int, needles: list[str], depths: list[int], keys: set[str], rng: random.Random) -> str:
        """n units of haystack with needle i inserted at depths[i] percent of the units."""
        if self.haystack == "essay":
            units, sep = sentences(self.corpus.take_words(n)), " "
        elif self.haystack == "noise":
            units, sep = [NOISE] * n, "\n"
        else:
            units, sep = [], "\n"
            while len(units) < n:
                key = self.draw(self.key_kind, rng)
                if key not in keys:  # a distractor must not answer the question
                    units.append(NEEDLE.format(kind=self.value_kind, key=key, value=self.draw(self.value_kind, rng)))
        cuts = [int(len(units) * depth / 100) for depth in depths]
        parts, start = [], 0
        for cut, needle in zip(cuts, needles):
            parts += units[start:cut] + [needle]
            start = cut
        return sep.join(parts + units[start:])
