"""The corpus tokenizer: a byte-level BPE trained on the training split, or an existing tokenizer.json.

A trained tokenizer reserves exactly n3's SPECIAL_TOKENS first (pad 0, bos 1, eos 2, the chat and reasoning
markers), so checkpoints carry the ids NemotronH configs expect. Byte-level means every string encodes: no unknowns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.errors import UserError
from model.tokenizer import SPECIAL_TOKENS, Tokenizer

BYTES = 256
MIN_VOCAB = BYTES + len(SPECIAL_TOKENS)
"""The byte alphabet plus the reserved tokens: the smallest vocabulary a byte-level BPE can have."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (reserved ones included) on `texts`."""
    check_vocab_size(vocab_size)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs {BYTES} byte tokens plus "
            f"{len(SPECIAL_TOKENS)} reserved ones ({' '.join(SPECIAL_TOKENS)}), at least {MIN_VOCAB}"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """An existing tokenizer.json (or a folder holding one, such as a checkpoint); it must have an eos token."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {path} has no {SPECIAL_TOKENS[2]} token to end documents with")
    return tokenizer
