"""Writing token shards: one .bin of tokens and one .idx of document offsets per source and split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.runtime.corpus import Split, shard_paths

FLUSH_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardWriter:
    """Appends documents as bos, tokens, eos; counts token frequencies (for the unigram entropy) as it goes."""

    def __init__(self, directory: Path, source: str, split: str, vocab_size: int, bos_id: int | None, eos_id: int):
        self.tokens_path, self.index_path = shard_paths(directory, source, split)
        self.tokens_path.parent.mkdir(parents=True, exist_ok=True)
        self.tokens_file = self.tokens_path.open("wb")
        self.dtype = np.dtype(token_dtype(vocab_size))
        self.prefix = [] if bos_id is None else [bos_id]
        self.suffix = [eos_id]
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.offsets: list[tuple[int, int]] = []
        self.written = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def add(self, ids: list[int]) -> None:
        document = np.asarray(self.prefix + ids + self.suffix, dtype=self.dtype)
        self.offsets.append((self.written + self.pending_tokens, len(document)))
        self.pending.append(document)
        self.pending_tokens += len(document)
        if self.pending_tokens >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            block = np.concatenate(self.pending)
            self.tokens_file.write(block.tobytes())
            self.counts += np.bincount(block, minlength=len(self.counts))[: len(self.counts)]
            self.written += len(block)
        self.pending, self.pending_tokens = [], 0

    def close(self) -> Split:
        self._flush()
        self.tokens_file.close()
        np.asarray(self.offsets, dtype=np.int64).reshape(-1, 2).tofile(self.index_path)
        return Split(tokens=self.written, documents=len(self.offsets))
