"""Checkpoint errors are one clear UserError each; a run folder resolves to its newest complete checkpoint."""

import json

import pytest

import model as n3
from model.errors import UserError
from tests.test_model import tiny_config


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    n3.save_pretrained(n3.build(tiny_config()), path)
    return path


def test_missing_and_malformed(tmp_path, saved):
    with pytest.raises(UserError, match="is not a directory"):
        n3.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        n3.from_pretrained(tmp_path)
    (saved / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        n3.from_pretrained(saved)


def test_truncated_weights(saved):
    shard = next(saved.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        n3.from_pretrained(saved)


def test_weights_that_disagree_with_the_config(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    with pytest.raises(UserError, match="has shape"):
        n3.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(config | {"hybrid_override_pattern": "M*EM-M"}))
    with pytest.raises(UserError, match="missing model.layers.5.mixer.A_log"):
        n3.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(UserError, match="nemotron_h"):
        n3.from_pretrained(saved)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = n3.build(tiny_config())
    n3.save_pretrained(model, tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("model.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        n3.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    n3.from_pretrained(tmp_path / "ckpt")


def test_resolve_run_folder(tmp_path, saved):
    run = tmp_path / "run"
    for step in ("step-00000010", "step-00000200", "step-00000300"):
        (run / "checkpoints" / step).mkdir(parents=True)
    (run / "checkpoints" / "step-00000200" / "config.json").write_text("{}")
    assert n3.resolve_checkpoint(run).name == "step-00000200"  # step 300 is incomplete
    assert n3.resolve_checkpoint(saved) == saved
    with pytest.raises(UserError, match="neither a checkpoint"):
        n3.resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        n3.resolve_checkpoint(tmp_path / "missing")
