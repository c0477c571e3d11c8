"""The long-context phase's rows (REFERENCE.md section 2): long rows blended from repository-level documents, synthetic
retrieval documents and the pretraining corpus; short rows from the pretraining corpus; each iteration all long or
all short, in a set ratio, with the same tokens.

Every row is a pure function of (seed, step, row): a resumed run draws what the first run would have drawn, and the
state to save is the step alone. A row is seq_len + 1 tokens of documents that each start with bos and end with
eos; labels after an eos are ignored (as pretraining packs), and with document masking `seq_idx` keeps the documents
of a row apart (a new document at every bos).

- repository: each standard-library package's .py files concatenated in path order, each under a `# path` line, as
  the Nemotron 3 reports measure loss by position on repository-level code. Documents are drawn with probability in
  proportion to their length (upsampling the long ones: a random window of a long document beats a row of short
  ones), a random window of each; the packages `held_out_packages` picks for the evaluation are never drawn.
- retrieval: key-value facts scattered through long filler (windows of the repository documents) and questions about
  them anywhere later, each followed by its answer, so a model learns to find a fact thousands of tokens back. Its
  wording is its own (RULER's needles and questions are the evaluation's, not training's).
- corpus: windows of the pretraining corpus' training split, its sources in the proportions of its last phase.
- user sources (NAME=PATH): documents read as `n3 data` reads them, drawn as repository's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.runtime.batches import MicroBatch, pack
from stages.runtime.corpus import Manifest, read_tokens
from stages.runtime.sources import parse_sources, stdlib_code, stdlib_packages


@dataclass
class Documents:
    """Tokenized documents (bos, ids, eos) laid end to end in one array, drawn in proportion to their lengths."""

    name: str
    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_texts(cls, name: str, texts: list[str], tokenizer: Tokenizer) -> Documents:
        """Each text tokenized between bos and eos."""
        return cls.from_arrays(name, [np.array([tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id],
                                               dtype=np.int64) for t in texts])

    @classmethod
    def from_arrays(cls, name: str, docs: list[np.ndarray]) -> Documents:
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(name, np.concatenate(docs) if docs else np.zeros(0, np.int64), starts, lengths)

    def without_markers(self, name: str) -> Documents:
        """The same documents without their bos and eos: filler that never starts or ends a document."""
        return Documents.from_arrays(name, [self.tokens[s + 1 : s + n - 1] for s, n in zip(self.starts, self.lengths)])

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` tokens: a random window of a document drawn by length, then more such windows while it is short."""
        out, need = [], length
        while need > 0:
            doc = rng.choice(len(self.lengths), p=self.lengths / self.lengths.sum())
            size = int(self.lengths[doc])
            offset = int(rng.integers(0, size - need + 1)) if size > need else 0
            take = min(size - offset, need)
            out.append(self.tokens[self.starts[doc] + offset : self.starts[doc] + offset + take])
            need -= take
        return np.concatenate(out)


def repository_documents() -> dict[str, str]:
    """Package name -> its repository-level document: every file under a line naming its path."""
    stdlib = stdlib_code()[0]
    return {package: "\n".join(f"# {path.relative_to(stdlib)}\n{path.read_text(encoding='utf-8', errors='replace')}"
                               for path in files)
            for package, files in stdlib_packages().items()}


def held_out_packages(docs: dict[str, str], tokenizer: Tokenizer, count: int, min_tokens: int
                      ) -> dict[str, np.ndarray]:
    """The `count` packages of `docs` (repository_documents), among those of at least min_tokens tokens, first in the
    order of a hash of their names (the same on every run and machine), as token arrays (bos + ids): the held-out
    long documents."""
    order = sorted(docs, key=lambda name: hashlib.sha256(name.encode()).digest())
    chosen = {}
    for name in order:
        ids = np.array([tokenizer.bos_id, *tokenizer.encode(docs[name])], dtype=np.int64)
        if len(ids) >= min_tokens:
            chosen[name] = ids
        if len(chosen) == count:
            break
    return chosen


KINDS = ["access code", "serial number", "locker number", "ticket number", "room number", "account id", "badge",
         "postal code", "order number", "pin"]
FACTS = ["The {kind} of {key} is {value}.", "{key} has {kind} {value}.", "Note: {key} was given {kind} {value}.",
         "For the record, the {kind} assigned to {key} reads {value}.", "{key} -> {kind} {value}"]
QUESTIONS = ["Q: What is the {kind} of {key}? A: The {kind} of {key} is {value}.",
             "Which {kind} does {key} have? {key} has {kind} {value}.",
             "Look up the {kind} of {key}: {value}."]


class Retrieval:
    """Synthetic retrieval documents: facts `key -> value` scattered through the first three quarters of long filler,
    and questions about them anywhere after the fact they ask about, each followed by its answer (every fact is asked
    once or twice). Keys are one or two words of the filler's vocabulary, values 5-9 digit numbers or short
    capital-letter codes. The filler (unbounded documents) holds no bos or eos, so a document stays one document
    under document masking."""

    def __init__(self, filler: Documents, tokenizer: Tokenizer, vocabulary: list[str]):
        self.filler, self.tokenizer, self.words = filler, tokenizer, vocabulary

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        facts = int(rng.integers(max(2, length // 200), max(3, length // 100)))  # 20 to 40 in 4096 tokens
        keys: list[str] = []
        while len(keys) < facts:
            key = "-".join(self.words[w] for w in rng.choice(len(self.words), int(rng.integers(1, 3))))
            if key not in keys:
                keys.append(key)
        slots = [{"kind": KINDS[k], "key": key, "value": self._value(rng)}
                 for k, key in zip(rng.choice(len(KINDS), facts), keys)]
        said = [self._say(rng, FACTS, slot) for slot in slots]
        asked = [(i, self._say(rng, QUESTIONS, slots[i])) for i in range(facts) for _ in range(rng.integers(1, 3))]
        body = length - 2 - sum(map(len, said)) - sum(len(q) for _, q in asked)
        if body < facts:
            raise UserError(f"a retrieval document needs more than {length} tokens for its facts; raise the length")
        told = rng.integers(0, 3 * body // 4, facts)
        events = [(int(told[i]), 0, ids) for i, ids in enumerate(said)]
        events += [(int(rng.integers(told[i], body + 1)), 1, ids) for i, ids in asked]
        filler, pieces, start = self.filler.row(rng, body), [[self.tokenizer.bos_id]], 0
        for cut, _, ids in sorted(events, key=lambda event: event[:2]):
            pieces += [filler[start:cut], ids]
            start = cut
        pieces += [filler[start:], [self.tokenizer.eos_id]]
        return np.concatenate([np.asarray(piece, dtype=np.int64) for piece in pieces])

    def _say(self, rng: np.random.Generator, templates: list[str], slot: dict) -> list[int]:
        return self.tokenizer.encode("\n" + templates[int(rng.integers(len(templates)))].format(**slot) + "\n")

    @staticmethod
    def _value(rng: np.random.Generator) -> str:
        if rng.random() < 0.75:
            return str(int(rng.integers(10 ** 4, 10 ** int(rng.integers(5, 10)))))
        return "".join(chr(65 + int(c)) for c in rng.integers(0, 26, int(rng.integers(4, 7))))


def filler_vocabulary(texts: list[str], size: int = 2000) -> list[str]:
    """The `size` most frequent lower-case alphabetic words of 4 to 10 letters in the texts: the keys' words."""
    counts: dict[str, int] = {}
    for text in texts:
        for word in text.split():
            if word.isalpha() and word.islower() and 4 <= len(word) <= 10:
                counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:size]


class CorpusWindows:
    """Random windows of the pretraining corpus' training split, each source in its last phase's proportion."""

    def __init__(self, directory, manifest: Manifest):
        weights = manifest.phases[-1].weights
        self.names = [s.name for s in manifest.sources if weights.get(s.name, 0) > 0]
        self.streams = [read_tokens(directory, manifest, name, "train") for name in self.names]
        share = np.array([weights[name] for name in self.names], dtype=np.float64)
        self.share = share / share.sum()

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        stream = self.streams[rng.choice(len(self.streams), p=self.share)]
        if len(stream) <= length:
            raise UserError(f"the pretraining corpus' training split ({len(stream):,} tokens) is shorter than one row "
                            f"({length:,} tokens)")
        start = int(rng.integers(0, len(stream) - length))
        return np.asarray(stream[start : start + length], dtype=np.int64)


def user_documents(arg: str, tokenizer: Tokenizer, short_len: int) -> Documents:
    """A NAME=PATH source of long documents (text files, a folder, jsonl), read as `n3 data` reads it; it must hold a
    document longer than the short length."""
    source = parse_sources([arg])[0]
    docs = Documents.from_texts(source.name, list(source.documents()), tokenizer)
    if not len(docs.lengths) or docs.lengths.max() <= short_len:
        longest = int(docs.lengths.max()) if len(docs.lengths) else 0
        raise UserError(f"extend.data {arg}: no document is longer than the short length ({short_len} tokens; the "
                        f"longest has {longest}); long-context data needs long documents")
    return docs


class ExtendBatches:
    """The step source of the long-context phase (runtime.loop): step s is short when the evenly spread share
    `short_fraction` of the steps falls on it, else long; both hold rows x seq_len tokens.

    Long steps: `rows` rows of seq_len tokens from the sources, each row's source drawn by the weights. Short steps:
    rows x seq_len / short_len rows of short_len tokens from the corpus. This rank's rows, in micro-batches of
    `micro` long rows (or as many tokens of short rows), are those runtime.batches.PackedBatches would give it."""

    def __init__(self, sources: list, weights: list[float], corpus: CorpusWindows, seq_len: int, short_len: int,
                 short_fraction: float, rows: int, micro: int, bos_id: int, eos_id: int, masking: bool,
                 rank: int = 0, world: int = 1, seed: int = 0):
        self.sources, self.corpus = sources, corpus
        share = np.array(weights or [1.0] * len(sources), dtype=np.float64)
        self.share = share / share.sum()
        self.seq_len, self.short_len, self.short_fraction = seq_len, short_len, short_fraction
        self.rows, self.micro, self.rank, self.world, self.seed = rows, micro, rank, world, seed
        self.bos_id, self.eos_id, self.masking = bos_id, eos_id, masking
        self.step, self.last = 0, "long"

    def is_short(self, step: int) -> bool:
        return int((step + 1) * self.short_fraction) > int(step * self.short_fraction)

    def phase(self) -> str:
        """The length of the step drawn last: long or short."""
        return self.last

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def next_step(self) -> list[MicroBatch]:
        short = self.is_short(self.step)
        scale = self.seq_len // self.short_len if short else 1
        length, micro = (self.short_len if short else self.seq_len), self.micro * scale
        per_rank = self.rows * scale // self.world
        mine = [(m * self.world + self.rank) * micro + i for m in range(per_rank // micro) for i in range(micro)]
        windows = [self._row(self.step, j, length, short) for j in mine]
        self.step, self.last = self.step + 1, "short" if short else "long"
        pairs = [pack(w, self.eos_id) for w in windows]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        if not self.masking:
            return [MicroBatch(x, y) for x, y in zip(inputs.split(micro), labels.split(micro))]
        seq_idx = torch.cumsum(inputs == self.bos_id, dim=1)
        return [MicroBatch(x, y, s) for x, y, s in zip(inputs.split(micro), labels.split(micro), seq_idx.split(micro))]

    def _row(self, step: int, row: int, length: int, short: bool) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, row])
        if short:
            return self.corpus.row(rng, length + 1)
        return self.sources[rng.choice(len(self.sources), p=self.share)].row(rng, length + 1)
