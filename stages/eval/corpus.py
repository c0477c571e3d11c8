"""Text that evaluations draw on: the built-in corpus (offline prose every Python ships) or a folder of .txt files.

The built-in corpus is the prose of the Python language reference as `help()` shows it (the `pydoc_data.topics`
module of the standard library): code and grammar blocks and section underlines are dropped, paragraphs are kept in
topic order. It is about 34,000 words; a haystack longer than that repeats it. Its text depends on the Python version,
which `Corpus.description` names.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from model.errors import UserError

_UNDERLINE = re.compile(r"[*=~^-]{3,}")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[A-Z\"'(\[*])")


@dataclass(frozen=True)
class Corpus:
    text: str
    description: str
    """What the text is, for reports: the built-in corpus with its Python version, or the folder and its files."""

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def digest(self) -> str:
        """A short hash of the text, so a report pins down exactly which haystack it used."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def take_words(self, n: int) -> str:
        """The first n words, the corpus repeated as often as needed."""
        words = self.words
        repeats, rest = divmod(n, len(words))
        return " ".join(words * repeats + words[:rest])


def builtin_corpus() -> Corpus:
    """The prose of the Python language reference (pydoc_data.topics)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module (the built-in corpus); give a folder of .txt files") from None
    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or any(line.startswith((" ", "\t")) for line in lines):  # code, grammar, indented lists
                continue
            if _UNDERLINE.fullmatch(lines[-1].strip()):  # a section title and its underline
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 5:
                paragraphs.append(text)
    text = " ".join(" ".join(paragraphs).split())
    version = ".".join(map(str, sys.version_info[:3]))
    words = len(text.split())
    return Corpus(text, f"built-in: the Python {version} language reference (pydoc_data.topics), {words:,} words")


def folder_corpus(folder: Path) -> Corpus:
    """Every .txt file of a folder (recursively, in path order), whitespace normalised."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--haystack {folder}: not a folder (give a folder of .txt files)")
    files = sorted(folder.rglob("*.txt"))
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{file} is not UTF-8 text") from None
    text = " ".join(" ".join(texts).split())
    if len(text.split()) < 100:
        raise UserError(f"--haystack {folder}: its .txt files hold {len(text.split())} words; give at least 100")
    return Corpus(text, f"{folder}: {len(files)} .txt file(s), {len(text.split()):,} words")


def sentences(text: str) -> list[str]:
    """Split prose into sentences at ., ! or ? followed by space and a capital (good enough for needle insertion)."""
    out, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        out.append(text[start : end.end()].strip())
        start = end.end()
    out.append(text[start:].strip())
    return [s for s in out if s]
