"""Variable tracking (RULER `variable_tracking.py`): a chain "VAR A = 12345", "VAR B = VAR A", ... hidden among
noise lines; the question asks for every variable that holds the value. One worked example (shorter names, its own
chain) comes first, as in RULER's one-shot prompt."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from stages.eval.ruler.draft import Draft, Generator
from stages.eval.ruler.niah import NOISE
from stages.eval.ruler.tasks import FAMILIES

LINE = NOISE + "\n"
EXAMPLE_LINES = 16
"""Noise lines in the worked example at lengths of 4k and more (RULER sizes its example to about 500 tokens); shorter
lengths scale it down."""


@dataclass
class VariableTracking(Generator):
    chains: int
    hops: int
    length: int

    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        family = FAMILIES["variable_tracking"]
        example_lines = EXAMPLE_LINES * min(self.length, 4096) // 4096
        example, names, value = self._prompt(example_lines, rng, name_length=3)
        example += family.answer_prefix.format(num_v=self.hops + 1, query=value) + " ".join(names)
        text, names, value = self._prompt(n, rng, name_length=5)
        return Draft(
            text=example + "\n\n" + text,
            answer_prefix=family.answer_prefix.format(num_v=self.hops + 1, query=value),
            answers=names,
        )

    def _prompt(self, n: int, rng: random.Random, name_length: int) -> tuple[str, list[str], str]:
        """The task text with n noise lines, the first chain's variables and its value."""
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
            if name not in names:
                names.append(name)
        chains = [names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)] for c in range(self.chains)]
        values = [str(rng.randint(10000, 99999)) for _ in chains]
        items = [LINE] * n
        for chain, value in zip(chains, values):
            statements = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])]
            slots = sorted(rng.choices(range(len(items) + 1), k=len(statements)))
            for j, (slot, statement) in enumerate(zip(slots, statements)):  # in chain order, among the noise
                items.insert(slot + j, statement)
        context = " ".join(items).replace(". \n", ".\n")
        text = FAMILIES["variable_tracking"].template.format(context=context, query=values[0])
        return text, chains[0], values[0]
