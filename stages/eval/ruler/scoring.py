"""RULER's scoring: a prediction is cleaned (stripped, control characters to newlines) and matched against the
reference answers, case-insensitively, as substrings. Scores are per sample in [0, 1]; reports show means x 100.

- string_match_all (needles, variable tracking, word extraction): the fraction of the references found.
- string_match_part (QA, where the references are alternative answers): 1 if any reference is found.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    text = prediction.lower()
    return float(max(ref.lower() in text for ref in references))
