"""The checkpoint the fine-tuning benchmarks give n3 and its transformers-based peer: without the MTP head
(transformers' NemotronH has none), with its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import presets
from model.checkpoint import from_pretrained, resolve_checkpoint, save_pretrained
from model.hybrid import build
from model.tokenizer import Tokenizer


def without_mtp(given: Path | None, out: Path) -> Tokenizer:
    """Write `given` (a checkpoint or run folder; None: a freshly initialised tiny model with the built-in corpus's
    tokenizer) into `out` without its MTP head; returns its tokenizer, saved there too."""
    if given is not None:
        model, tokenizer = from_pretrained(resolve_checkpoint(given)), Tokenizer.load(resolve_checkpoint(given))
    else:
        from stages.data import CorpusOptions, default_corpus_dir, parse_sources, prepare

        cfg = presets.load("cpu")
        corpus = default_corpus_dir(cfg.model.vocab_size)
        prepare(parse_sources([]), corpus, CorpusOptions(vocab_size=cfg.model.vocab_size))
        model, tokenizer = build(cfg.model), Tokenizer.load(corpus)
    bare = build(dataclasses.replace(model.config, pattern=model.config.main_pattern))
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    save_pretrained(bare, out)
    tokenizer.save(out)
    return tokenizer
