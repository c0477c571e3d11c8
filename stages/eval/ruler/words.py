"""English word lists (wonderwords' nouns, adjectives and verbs, as RULER uses them): needle keys are
adjective-noun pairs, common-words extraction draws from all three lists."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from model.errors import UserError


@dataclass(frozen=True)
class WordLists:
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        return sorted(set(self.nouns + self.adjectives + self.verbs))


@cache
def word_lists() -> WordLists:
    try:
        assets = resources.files("wonderwords") / "assets"
    except ModuleNotFoundError:
        raise UserError("RULER's word lists come from wonderwords: pip install 'n3[eval]'") from None

    def read(name: str) -> tuple[str, ...]:
        return tuple(sorted({w.strip() for w in (assets / name).read_text().splitlines() if w.strip()}))

    return WordLists(read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt"))
