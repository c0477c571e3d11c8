"""The prepared-corpus format `n3 data` writes and the training stages read.

    DIR/manifest.json                 what is below, the blend and curriculum, the fingerprint of the inputs
    DIR/tokenizer.json (+ _config)    the tokenizer the shards were encoded with
    DIR/shards/<source>.<split>.bin   tokens, native byte order, uint16 (vocab <= 65536) or uint32
    DIR/shards/<source>.<split>.idx   int64 start offset of every document in the .bin, then its length in tokens

Each document is stored as bos, its tokens, eos, so a stream of documents is a slice of a .bin file. Splits are
"train" and "val". Blend weights are per source and per curriculum phase, normalised to sum to 1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import UserError
from stages.runtime.files import write_json

MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "val")


@dataclass
class Split:
    tokens: int
    documents: int


@dataclass
class SourceEntry:
    name: str
    origin: str
    """Where the documents came from (a path, or a description of the built-in corpus)."""
    quality: bool
    """Marked as high quality: favoured in the second curriculum phase."""
    weight: float
    """The user's multiplier on the source's natural share of tokens (2 = sampled twice as often)."""
    splits: dict[str, Split]


@dataclass
class Phase:
    name: str
    weights: dict[str, float]
    """Source name -> probability that a training sequence is drawn from it; sums to 1."""


@dataclass
class Manifest:
    fingerprint: str
    """Digest of the inputs and options the shards depend on; equal fingerprints mean nothing to redo."""
    blend_fingerprint: str
    """Digest of the options only the blend and curriculum depend on."""
    vocab_size: int
    dtype: str
    bos_id: int
    eos_id: int
    pad_id: int
    sources: list[SourceEntry]
    switch_at: float
    """Fraction of the training tokens after which the second phase starts."""
    phases: list[Phase]
    unigram_entropy: float
    """Entropy of the training tokens' unigram distribution, in nats: the loss of a model that ignores context."""
    duplicates_removed: int = 0
    format: int = FORMAT
    notes: list[str] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        """Write manifest.json through a temporary file and a rename."""
        write_json(directory / MANIFEST, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        file = directory / MANIFEST
        if not file.is_file():
            raise UserError(f"{directory} is not a prepared corpus (no {MANIFEST}); prepare one with `n3 data`")
        try:
            raw = json.loads(file.read_text())
            if raw.get("format") != FORMAT:
                raise UserError(f"{file} has format {raw.get('format')}; this n3 reads format {FORMAT}: rerun `n3 data`")
            raw["sources"] = [
                SourceEntry(**s | {"splits": {k: Split(**v) for k, v in s["splits"].items()}}) for s in raw["sources"]
            ]
            raw["phases"] = [Phase(**p) for p in raw["phases"]]
            manifest = cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            raise UserError(f"{file} is malformed ({err}); rerun `n3 data`") from None
        for source in manifest.sources:
            for split in SPLITS:
                for path in shard_paths(directory, source.name, split):
                    if not path.is_file():
                        raise UserError(f"{path} is missing; rerun `n3 data` to rebuild the corpus")
        return manifest

    def phase_at(self, fraction: float) -> Phase:
        """The curriculum phase at this fraction of the training tokens."""
        return self.phases[0] if fraction < self.switch_at or len(self.phases) == 1 else self.phases[1]


def shard_paths(directory: Path, source: str, split: str) -> tuple[Path, Path]:
    """(tokens .bin, document index .idx) of one source's split."""
    folder = Path(directory) / "shards"
    return folder / f"{source}.{split}.bin", folder / f"{source}.{split}.idx"


def read_tokens(directory: Path, manifest: Manifest, source: str, split: str) -> np.ndarray:
    """The split's tokens, memory-mapped (nothing is read until used)."""
    tokens, _ = shard_paths(directory, source, split)
    if tokens.stat().st_size == 0:
        return np.zeros(0, dtype=manifest.dtype)
    return np.memmap(tokens, dtype=manifest.dtype, mode="r")


def read_index(directory: Path, source: str, split: str) -> np.ndarray:
    """(documents, 2) int64: start offset and length of each document of the split."""
    _, index = shard_paths(directory, source, split)
    return np.fromfile(index, dtype=np.int64).reshape(-1, 2)
