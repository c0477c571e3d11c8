"""`n3 data`: text, folders, jsonl or the built-in corpus -> tokenizer -> token shards + blend/curriculum manifest."""

from stages.data.blend import BlendOptions
from stages.data.prepare import CorpusOptions, Prepared, default_corpus_dir, prepare
from stages.runtime.sources import BUILTIN, parse_sources

__all__ = ["BUILTIN", "BlendOptions", "CorpusOptions", "Prepared", "default_corpus_dir", "parse_sources", "prepare"]
