"""`n3 data`: prepare a corpus for training: sources -> tokenizer -> token shards + blend/curriculum manifest.

    n3 data                                      the built-in corpus (Python's own source and docs), into the n3 cache
    n3 data notes/ wiki=dump.jsonl --out corpus  your own files, folders and jsonl; then
    n3 pretrain --set data.path=corpus
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from n3cli.options import DEFAULT_PRESET, Out, Preset, Sets, load_preset, parse_weights

DEFAULT_OUT = Path("corpus")


def run(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[[NAME=]PATH]...",
            help="Text files, folders (every file in them) and .jsonl files; 'builtin' is the built-in corpus "
            "(the default). NAME names the source in the blend (default: the file or folder name).",
        ),
    ] = None,
    out: Out = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Use this tokenizer.json (or a folder holding one, e.g. a released Nemotron model) "
                     "instead of training a BPE."),
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="Tokens of the BPE to train; default: the preset's model.vocab_size.")
    ] = None,
    field: Annotated[str, typer.Option(help="The jsonl field that holds the text.")] = "text",
    weight: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=W", help="Sample source NAME W times its natural share of tokens. Repeatable."),
    ] = None,
    quality: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Mark a source as quality (favoured in phase 2); replaces the default "
                     "marks (the built-in docs). Repeatable."),
    ] = None,
    quality_boost: Annotated[float, typer.Option(help="Phase 2 multiplies the quality sources' weights by this.")] = 4.0,
    switch_at: Annotated[
        float, typer.Option(help="Fraction of the training tokens after which phase 2 (quality) starts.")
    ] = 0.75,
    val_fraction: Annotated[float, typer.Option(help="Share of each source's documents held out.")] = 0.01,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
) -> None:
    """Prepare a training corpus: deduplicate, split, tokenize into memory-mapped shards, write the manifest.

    Reruns on unchanged inputs do nothing; changing only weights or the curriculum rewrites only the manifest.
    """
    from n3cli.progress import RichProgress
    from n3cli.report import print_corpus
    from stages.data import BUILTIN, BlendOptions, CorpusOptions, default_corpus_dir, parse_sources, prepare

    cfg = load_preset(preset, overrides)
    vocab = vocab_size or cfg.model.vocab_size
    parsed = parse_sources(sources or [], field)
    builtin_only = all(s == BUILTIN for s in sources or [BUILTIN])
    directory = out or (default_corpus_dir(vocab) if builtin_only and tokenizer is None else DEFAULT_OUT)
    options = CorpusOptions(
        vocab_size=vocab, tokenizer=tokenizer, val_fraction=val_fraction,
        blend=BlendOptions(weights=parse_weights(weight), quality=quality, quality_boost=quality_boost,
                           switch_at=switch_at),
    )
    with RichProgress() as progress:
        prepared = prepare(parsed, directory, options, progress)
    print_corpus(prepared)
