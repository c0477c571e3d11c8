"""`n3 eval perplexity`: the model's log-likelihood of every token of a text file or of a prepared corpus's
validation split, through the backend's scoring (the model's forward; echo + logprobs for an endpoint).

Long inputs are scored in rolling windows of at most `window` tokens: the first window scores its tokens 2..end,
each later one scores the next `stride` tokens given the window's earlier tokens as context, so every token after
the first is scored exactly once (stride = window - 1, the default, gives disjoint windows; a smaller stride gives
each token more context at more cost).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.rollout.backend import Backend
from stages.runtime.corpus import Manifest, read_tokens


@dataclass
class Tokens:
    ids: list[int] | np.ndarray
    """A list, or for a corpus split an array read from its shards (a list of every token would not fit)."""
    source: str
    """What was tokenized, for reports."""
    text_bytes: int | None = None
    """UTF-8 bytes of the text the ids encode (for bits per byte), when known."""

    def window(self, start: int, end: int) -> list[int]:
        return [int(t) for t in self.ids[start:end]]


@dataclass
class PerplexityResult:
    source: str
    backend: str
    scored: int
    """Tokens scored (every token but the first)."""
    nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    window: int
    stride: int
    windows: int
    text_bytes: int | None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float | None:
        """Total NLL in bits over the text's bytes: comparable across tokenizers."""
        return None if not self.text_bytes else self.nll * self.scored / (math.log(2) * self.text_bytes)

    def summary(self) -> dict:
        return {"benchmark": "perplexity", "source": self.source, "backend": self.backend, "tokens_scored": self.scored,
                "nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "window": self.window, "stride": self.stride, "windows": self.windows}


def rolling_windows(n: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, scored) windows over an n-token sequence: tokens[start:end] is fed and its last `scored` tokens
    are scored. Together they score positions 1..n-1 once each."""
    stride = window - 1 if stride is None else stride
    if window < 2 or not 1 <= stride < window:
        raise UserError(f"need window >= 2 and 1 <= stride < window; got window {window}, stride {stride}")
    end = min(n, window)
    windows = [(0, end, end - 1)] if n > 1 else []
    while end < n:
        new_end = min(n, end + stride)
        windows.append((max(0, new_end - window), new_end, new_end - end))
        end = new_end
    return windows


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def text_tokens(backend: Backend, path: Path, max_tokens: int | None = None) -> Tokens:
    """A text file as one document: bos (if the tokenizer has one) and its tokens."""
    text = read_text(path)
    ids = backend.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        return Tokens(ids, f"{path} (first {max_tokens:,} tokens)")
    return Tokens(ids, str(path), len(text.encode()))


def validation_tokens(directory: Path, tokenizer: Tokenizer, max_tokens: int | None = None) -> Tokens:
    """The validation split of a corpus prepared by `n3 data` (DIR/manifest.json, DIR/shards/<source>.val.bin:
    documents stored as bos, tokens, eos), every source in manifest order. Its tokenizer must be the model's."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    corpus_tokenizer = directory / "tokenizer.json"
    if corpus_tokenizer.is_file() and Tokenizer.load(corpus_tokenizer).backend.get_vocab() != tokenizer.backend.get_vocab():
        raise UserError(f"{directory} was tokenized with another tokenizer than the model's; its perplexity would "
                        "mean nothing")
    sources = [s.name for s in manifest.sources]
    ids = np.concatenate([read_tokens(directory, manifest, name, "val") for name in sources] or [np.zeros(0, manifest.dtype)])
    if len(ids) < 2:
        raise UserError(f"{directory} has no validation tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
    return Tokens(ids, f"{directory} (validation split, {len(sources)} source(s), {len(ids):,} tokens)")


def perplexity(backend: Backend, tokens: Tokens, window: int | None = None, stride: int | None = None,
               progress: Callable[[int, int], None] = lambda n, total: None) -> PerplexityResult:
    """Score every token but the first; `progress(k, total)` after each k of the total windows. window defaults to
    the backend's context (less one token: an endpoint generates one while it scores), else 2048."""
    window = window or (backend.context or 2049) - 1
    if backend.context is not None and window >= backend.context:
        raise UserError(f"window {window} does not fit the served context ({backend.context} tokens, one of them "
                        "generated while scoring)")
    windows = rolling_windows(len(tokens.ids), window, stride)
    if not windows:
        raise UserError(f"{tokens.source}: fewer than two tokens to score")
    total, pending = 0.0, iter(windows)
    while chunk := list(itertools.islice(pending, backend.batch_size)):
        scores = backend.score([tokens.window(start, end) for start, end, _ in chunk])
        total += sum(s.logprob for (_, _, scored), per_token in zip(chunk, scores) for s in per_token[-scored:])
        progress(len(chunk), len(windows))
    scored = len(tokens.ids) - 1
    return PerplexityResult(tokens.source, backend.description, scored, -total / scored, window,
                            stride or window - 1, len(windows), tokens.text_bytes)
