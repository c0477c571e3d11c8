"""`n3 data`: sources, deduplication, the split, shards and their index, the blend and curriculum, idempotence, and a
clear error for every bad input."""

import json
import os

import numpy as np
import pytest

from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.data import BlendOptions, CorpusOptions, parse_sources, prepare
from stages.data.prepare import unigram_entropy
from stages.runtime.sources import builtin_sources
from stages.runtime.corpus import Manifest, read_index, read_tokens
from tests.conftest import write_documents


def test_builtin_corpus_is_the_standard_library():
    sources = builtin_sources()
    names = [s.name for s in sources]
    assert names[0] == "python-code" and all(f.suffix == ".py" for f in sources[0].files)
    assert not any({"test", "site-packages", "encodings"} & set(f.parts) for f in sources[0].files)
    assert len(sources[0].files) > 100
    if "python-docs" in names:  # pydoc's topics ship with CPython; a distribution may split them out
        docs = sources[1]
        assert docs.quality and not sources[0].quality
        assert any("Built-in Functions" in text or "assert" in text for text in docs.documents())


def test_shards_hold_every_document_once(tmp_path):
    write_documents(tmp_path / "a", 12, seed=0, kind="prose")
    (tmp_path / "a" / "copy.txt").write_text((tmp_path / "a" / "prose0003.txt").read_text())  # an exact duplicate
    (tmp_path / "a" / "blank.txt").write_text("  \n")
    (tmp_path / "a" / "special.txt").write_text("a file that mentions </s> and <|im_start|> as text")
    rows = [{"text": f"record {i} says hello", "id": i} for i in range(6)] + [{"text": "record 0 says hello"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sources = parse_sources([str(tmp_path / "a"), f"records={tmp_path / 'b.jsonl'}"])
    prepared = prepare(sources, tmp_path / "out", CorpusOptions(vocab_size=300, val_fraction=0.2))
    m, out = prepared.manifest, tmp_path / "out"
    assert prepared.work == "built" and m.duplicates_removed == 2 and m.dtype == "uint16"
    tokenizer = Tokenizer.load(out)
    texts = []
    for source in m.sources:
        for split in ("train", "val"):
            tokens, index = read_tokens(out, m, source.name, split), read_index(out, source.name, split)
            assert len(tokens) == m.sources[[s.name for s in m.sources].index(source.name)].splits[split].tokens
            assert index[:, 1].sum() == len(tokens) and np.all(index[1:, 0] == np.cumsum(index[:, 1])[:-1])
            for start, length in index:
                doc = tokens[start : start + length].tolist()
                assert doc[0] == m.bos_id and doc[-1] == m.eos_id
                assert m.eos_id not in doc[1:-1] and m.bos_id not in doc[1:-1]
                texts.append(tokenizer.decode(doc[1:-1]))
    originals = {p.read_text() for p in (tmp_path / "a").iterdir() if p.read_text().strip()}
    assert sorted(texts) == sorted(originals | {r["text"] for r in rows})
    splits = {s.name: s.splits for s in m.sources}
    assert splits["a"]["val"].documents == 3 and splits["records"]["val"].documents == 2  # ceil(0.2 x n)
    all_train = np.concatenate([read_tokens(out, m, s.name, "train") for s in m.sources])
    assert m.unigram_entropy == pytest.approx(unigram_entropy(np.bincount(all_train)))


def test_blend_and_curriculum(small_corpus):
    m = Manifest.load(small_corpus)
    tokens = {s.name: s.splits["train"].tokens for s in m.sources}
    natural = tokens["prose"] / sum(tokens.values())
    phase1, phase2 = (p.weights for p in m.phases)
    assert m.switch_at == 0.75 and phase1["prose"] == pytest.approx(natural)
    boosted = 4 * tokens["prose"] / (4 * tokens["prose"] + tokens["code"])
    assert phase2["prose"] == pytest.approx(boosted) and sum(phase2.values()) == pytest.approx(1)


def test_rerun_does_no_work_and_reblends_without_reencoding(tmp_path):
    write_documents(tmp_path / "src", 20, seed=3, kind="code")
    sources = lambda: parse_sources([str(tmp_path / "src")])  # noqa: E731
    out = tmp_path / "out"
    first = prepare(sources(), out, CorpusOptions(vocab_size=300))
    shard = out / "shards" / "src.train.bin"
    stamp = shard.stat().st_mtime_ns
    assert prepare(sources(), out, CorpusOptions(vocab_size=300)).work == "up to date"
    again = prepare(sources(), out, CorpusOptions(vocab_size=300, blend=BlendOptions(switch_at=0.5)))
    assert again.work == "reblended" and Manifest.load(out).switch_at == 0.5 and shard.stat().st_mtime_ns == stamp
    assert again.manifest.fingerprint == first.manifest.fingerprint
    (tmp_path / "src" / "code0000.txt").write_text("changed\n")
    assert prepare(sources(), out, CorpusOptions(vocab_size=300)).work == "built"
    assert prepare(sources(), out, CorpusOptions(vocab_size=310)).work == "built"
    (out / "manifest.json").write_text("{damaged")
    assert prepare(sources(), out, CorpusOptions(vocab_size=310)).work == "built"


def test_existing_tokenizer(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    write_documents(tmp_path / "src", 5, seed=4, kind="prose")
    prepared = prepare(parse_sources([str(tmp_path / "src")]), tmp_path / "out", CorpusOptions(1, tokenizer=tmp_path))
    assert prepared.manifest.vocab_size == tokenizer.vocab_size
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_bad_inputs_are_clear_errors(tmp_path):
    write_documents(tmp_path / "ok", 3, seed=5, kind="prose")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("not a corpus")
    ok = lambda: parse_sources([str(tmp_path / "ok")])  # noqa: E731
    cases = [
        (lambda: parse_sources([str(tmp_path / "missing")]), "does not exist"),
        (lambda: parse_sources([str(tmp_path / "empty")]), "holds no files"),
        (lambda: parse_sources([str(tmp_path / "ok"), f"ok={tmp_path / 'blank'}"]), "two sources are named 'ok'"),
        (lambda: prepare(parse_sources([str(tmp_path / "blank")]), tmp_path / "o1", CorpusOptions(300)),
         "has no documents"),
        (lambda: prepare(parse_sources([str(tmp_path / "bad.jsonl")]), tmp_path / "o2", CorpusOptions(300)),
         r"bad.jsonl:2: not valid JSON"),
        (lambda: prepare(parse_sources([str(tmp_path / "nofield.jsonl")]), tmp_path / "o3", CorpusOptions(300)),
         "no field 'text' .has body.; choose one with --field"),
        (lambda: prepare(ok(), tmp_path / "o4", CorpusOptions(100)), "vocab size 100 is too small.*at least 265"),
        (lambda: prepare(ok(), tmp_path / "o5", CorpusOptions(300, blend=BlendOptions(weights={"nope": 2.0}))),
         "--weight names unknown source 'nope'"),
        (lambda: prepare(ok(), tmp_path / "busy", CorpusOptions(300)), "exists and is not a prepared corpus"),
        (lambda: prepare(ok(), tmp_path / "o6", CorpusOptions(300, tokenizer=tmp_path / "ok")), "no tokenizer.json"),
        (lambda: Manifest.load(tmp_path / "ok"), "not a prepared corpus"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    assert sorted(os.listdir(tmp_path / "busy")) == ["mine.txt"]  # untouched
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temporary folder left behind
