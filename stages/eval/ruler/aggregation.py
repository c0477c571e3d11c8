"""Aggregation tasks: common words extraction (RULER `common_words_extraction.py`: a numbered list where ten words
recur far more often than the rest) and frequent words extraction (`freq_words_extraction.py`: coded words drawn from
a Zipf (zeta) law; the three most frequent after the "..." noise word are the answer)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from stages.eval.ruler.draft import Draft, Generator
from stages.eval.ruler.tasks import FAMILIES


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


@dataclass
class CommonWords(Generator):
    """n units = the uncommon words (each listed freq_ucw times) besides the num_cw common ones (freq_cw times).
    Below 4k tokens RULER lists common words 6 times and the others once, and uses a smaller worked example."""

    words: list[str]
    freq_cw: int
    freq_ucw: int
    num_cw: int
    length: int

    def __post_init__(self) -> None:
        self.max_units = len(self.words) - self.num_cw

    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        family = FAMILIES["common_words_extraction"]
        short = self.length < 4096
        example_list, example_answer = self._list(rng, 20 if short else 40, *((3, 1) if short else (10, 3)))
        word_list, answer = self._list(rng, self.num_cw + n, *((6, 1) if short else (self.freq_cw, self.freq_ucw)))
        example = family.template.format(context=example_list) + family.answer_prefix + " " + numbered(example_answer)
        return Draft(example + "\n" + family.template.format(context=word_list), family.answer_prefix, answer)

    def _list(self, rng: random.Random, words: int, freq_cw: int, freq_ucw: int) -> tuple[str, list[str]]:
        chosen = rng.sample(self.words, words)
        common, uncommon = chosen[: self.num_cw], chosen[self.num_cw :]
        listed = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(listed)
        return numbered(listed), common


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum plus its Euler-Maclaurin tail (error far below 1e-9)."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms**-alpha + alpha / 12 * terms ** (-alpha - 1)


@dataclass
class FrequentWords(Generator):
    """n units = the words of text; the word of rank k appears int(n k^-alpha / zeta(alpha)) times among a vocabulary
    of length / 50 random 6-letter words, whose most frequent is replaced by the noise word '...'."""

    alpha: float
    length: int
    word_length: int = 6

    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        size = max(self.length // 50, 5)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.word_length)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."
        norm = zeta(self.alpha)
        text = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k**-self.alpha / norm))]
        rng.shuffle(text)
        family = FAMILIES["freq_words_extraction"]
        return Draft(family.template.format(context=" ".join(text)), family.answer_prefix, ranked[1:4])

