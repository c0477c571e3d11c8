"""`n3 data`: sources -> deduplicated documents -> train/val split -> tokenizer -> token shards -> manifest.

Three passes over the sources, each streaming: scan (hash every document, drop exact duplicates, choose the
validation documents), train the tokenizer on the training documents, encode. A rerun on unchanged inputs and options
does nothing; a rerun that changes only the blend rewrites only the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.checkpoint import atomic_directory
from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.data.blend import BlendOptions, curriculum
from stages.data.shards import ShardWriter, token_dtype
from stages.runtime.sources import Source
from stages.data.tokenizer import check_vocab_size, load_tokenizer, train_tokenizer
from stages.runtime.corpus import FORMAT, MANIFEST, Manifest, SourceEntry
from stages.runtime.progress import Progress, Quiet

ENCODE_BATCH = 256


@dataclass
class CorpusOptions:
    vocab_size: int
    """Size of the BPE to train (ignored with `tokenizer`)."""
    tokenizer: Path | None = None
    """An existing tokenizer.json, or a folder holding one, instead of training a BPE."""
    val_fraction: float = 0.01
    """Share of each source's documents held out for validation (at least one where a source has two)."""
    blend: BlendOptions = field(default_factory=BlendOptions)


@dataclass
class Prepared:
    directory: Path
    manifest: Manifest
    work: str
    """What this call did: "built", "reblended" (the manifest only) or "up to date"."""


def default_corpus_dir(vocab_size: int) -> Path:
    """Where the built-in corpus is prepared for a vocabulary size: under $N3_CACHE (default ~/.cache/n3)."""
    cache = os.environ.get("N3_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "n3"
    return Path(cache) / "corpus" / f"builtin-py{sysconfig.get_python_version()}-v{vocab_size}"


def prepare(sources: list[Source], out: Path, options: CorpusOptions, progress: Progress | None = None) -> Prepared:
    """Prepare `sources` into the corpus folder `out`, doing only what changed since the last call."""
    progress = progress or Quiet()
    out = Path(out)
    names = [s.name for s in sources]
    options.blend.check(names)
    if not 0 <= options.val_fraction <= 0.5:
        raise UserError(f"--val-fraction {options.val_fraction}: choose a fraction between 0 and 0.5")
    if options.blend.quality is not None:
        for source in sources:
            source.quality = source.name in options.blend.quality
    for source in sources:
        source.weight = options.blend.weights.get(source.name, 1.0)
    if options.tokenizer is None:
        check_vocab_size(options.vocab_size)
    fingerprint = _digest(
        FORMAT, [s.fingerprint() for s in sources], options.val_fraction,
        _file_digest(options.tokenizer) if options.tokenizer else options.vocab_size,
    )
    blend_fingerprint = _digest([(s.name, s.weight, s.quality) for s in sources], options.blend.quality_boost,
                                options.blend.switch_at)

    previous = _previous(out)
    if previous is not None and previous.fingerprint == fingerprint:
        if previous.blend_fingerprint == blend_fingerprint:
            return Prepared(out, previous, "up to date")
        for entry in previous.sources:
            source = next(s for s in sources if s.name == entry.name)
            entry.weight, entry.quality = source.weight, source.quality
        previous.phases, previous.notes = curriculum(previous.sources, options.blend.quality_boost)
        previous.switch_at, previous.blend_fingerprint = options.blend.switch_at, blend_fingerprint
        previous.save(out)
        return Prepared(out, previous, "reblended")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):  # a damaged corpus is rebuilt
        raise UserError(f"{out} exists and is not a prepared corpus; choose an empty or new folder with --out")

    with atomic_directory(out) as tmp:
        manifest = _build(sources, tmp, options, progress)
        manifest.fingerprint, manifest.blend_fingerprint = fingerprint, blend_fingerprint
        manifest.save(tmp)
    return Prepared(out, manifest, "built")


def _previous(out: Path) -> Manifest | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        return Manifest.load(out)
    except UserError:  # damaged or from another version: rebuild it
        return None


def _build(sources: list[Source], directory: Path, options: CorpusOptions, progress: Progress) -> Manifest:
    total_bytes = sum(f.stat().st_size for s in sources for f in s.files)
    progress.start("reading and deduplicating", total=total_bytes)
    kept, duplicates = _scan(sources, progress)
    for source in sources:
        if not kept[source.name]:
            skipped = source.stats.get("skipped", 0)
            why = f" ({skipped} files skipped as binary or not UTF-8)" if skipped else ""
            raise UserError(f"source {source.name} ({source.origin}) has no documents{why}")
    val = _choose_validation(kept, options.val_fraction)

    if options.tokenizer is not None:
        tokenizer = load_tokenizer(options.tokenizer)
    else:
        train_documents = sum(len(digests) - len(val[name]) for name, digests in kept.items())
        progress.start(f"training a {options.vocab_size}-token BPE", total=train_documents)
        texts = (text for _, text, split in _documents(sources, val) if split == "train")
        tokenizer = train_tokenizer(_counted(texts, progress), options.vocab_size)
    tokenizer.save(directory)

    progress.start("tokenizing", total=sum(len(d) for d in kept.values()))
    writers = {
        (s.name, split): ShardWriter(directory, s.name, split, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
        for s in sources for split in ("train", "val")
    }
    batch: list[tuple[str, str, str]] = []
    for document in _documents(sources, val):
        batch.append(document)
        if len(batch) == ENCODE_BATCH:
            _encode(batch, tokenizer, writers, progress)
            batch = []
    _encode(batch, tokenizer, writers, progress)

    splits = {key: writer.close() for key, writer in writers.items()}
    counts = sum(writers[s.name, "train"].counts for s in sources)
    entries = [
        SourceEntry(s.name, s.origin, s.quality, s.weight, {split: splits[s.name, split] for split in ("train", "val")})
        for s in sources
    ]
    phases, notes = curriculum(entries, options.blend.quality_boost)
    return Manifest(
        fingerprint="", blend_fingerprint="", vocab_size=tokenizer.vocab_size, dtype=token_dtype(tokenizer.vocab_size),
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, sources=entries,
        switch_at=options.blend.switch_at, phases=phases, unigram_entropy=unigram_entropy(counts),
        duplicates_removed=duplicates, notes=notes,
    )


def _scan(sources: list[Source], progress: Progress) -> tuple[dict[str, list[bytes]], int]:
    """Digests of each source's unique non-empty documents, in order, and how many duplicates were dropped."""
    seen: set[bytes] = set()
    kept: dict[str, list[bytes]] = {s.name: [] for s in sources}
    duplicates = 0
    for source in sources:
        for text in source.documents():
            progress.advance(len(text.encode("utf-8", errors="replace")))
            if not text.strip():
                continue
            digest = _text_digest(text)
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            kept[source.name].append(digest)
    return kept, duplicates


def _choose_validation(kept: dict[str, list[bytes]], fraction: float) -> dict[str, set[bytes]]:
    """Per source, the documents with the smallest digests: a fixed, content-defined sample."""
    val = {}
    for name, digests in kept.items():
        n = math.ceil(fraction * len(digests)) if fraction > 0 and len(digests) > 1 else 0
        val[name] = set(sorted(digests)[:n])
    return val


def _documents(sources: list[Source], val: dict[str, set[bytes]]) -> Iterator[tuple[str, str, str]]:
    """(source name, text, split) of every kept document, deduplicated exactly as the scan did."""
    seen: set[bytes] = set()
    for source in sources:
        for text in source.documents():
            if not text.strip():
                continue
            digest = _text_digest(text)
            if digest in seen:
                continue
            seen.add(digest)
            yield source.name, text, "val" if digest in val[source.name] else "train"


def _encode(batch, tokenizer: Tokenizer, writers: dict, progress: Progress) -> None:
    if not batch:
        return
    # A document that mentions "</s>" or "<|im_start|>" keeps it as text: only the writer marks boundaries.
    backend = tokenizer.backend
    backend.encode_special_tokens = True
    try:
        encodings = backend.encode_batch([text for _, text, _ in batch], add_special_tokens=False)
    finally:
        backend.encode_special_tokens = False
    for (name, _, split), encoding in zip(batch, encodings):
        writers[name, split].add(encoding.ids)
    progress.advance(len(batch))


def _counted(texts: Iterator[str], progress: Progress) -> Iterator[str]:
    for text in texts:
        progress.advance()
        yield text


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequencies: the cross-entropy of the best context-free predictor."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).digest()


def _file_digest(path: Path) -> str:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer.json at {path}")
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
