"""The 13 RULER tasks (NVIDIA/RULER `scripts/synthetic.yaml`) and their families' templates, answer prefixes, generation
lengths and metrics (RULER's `data/synthetic/constants.py` and `eval/synthetic/constants.py`).

A prompt is the family's template filled with the task's context and query, then its answer prefix: the model
continues the answer rather than starting one. The texts are RULER's, word for word (typos included: scores stay
comparable with published ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stages.eval.ruler.scoring import string_match_all, string_match_part


@dataclass(frozen=True)
class Family:
    template: str
    answer_prefix: str
    tokens_to_generate: int
    metric: Callable[[str, list[str]], float]


FAMILIES = {
    "niah": Family(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
        string_match_all,
    ),
    "variable_tracking": Family(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined "
        "the value {query}, they are: ",
        30,
        string_match_all,
    ),
    "common_words_extraction": Family(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
        string_match_all,
    ),
    "freq_words_extraction": Family(
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
        string_match_all,
    ),
    "qa": Family(
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32,
        string_match_part,
    ),
}


@dataclass(frozen=True)
class Task:
    family: str
    args: dict = field(default_factory=dict)

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]


def _niah(haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> Task:
    return Task("niah", dict(haystack=haystack, key_kind=key, value_kind=value, keys=keys, values=values,
                             queries=queries))


# haystack: noise (the repeated "The grass is green..." lines), essay (prose from the corpus), needle (distractor
# needles with other keys). Keys and values: words (adjective-noun), numbers (7 digits), uuids.
TASKS: dict[str, Task] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", queries=4),
    "vt": Task("variable_tracking", dict(chains=1, hops=4)),
    "cwe": Task("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": Task("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": Task("qa", dict(dataset="squad")),
    "qa_2": Task("qa", dict(dataset="hotpotqa")),
}
