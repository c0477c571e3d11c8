"""`n3 sft` end to end on a tiny model: the run folder and its report, a checkpoint that transformers loads with its
chat template, a SIGKILLed run resumed to bitwise the same losses, two gloo processes matching one, LoRA merged into
plain weights, chat files as data, and clear errors for bad input."""

import json
import re

import pytest
import torch

import model as n3
from model.tokenizer import Tokenizer
from presets import load
from stages.chat.sources import parse_chat_sources
from stages.runtime.metrics import read_metrics
from stages.sft import sft
from tests.test_engine import random_model
from tests.test_pretrain import assert_killed_and_resumed_repeats, cli, n3_process, torchrun

FAST = ["sft.train.seq_len=256", "sft.train.micro_batch_size=2", "sft.train.global_batch_size=4",
        "sft.train.steps=4", "sft.train.warmup_steps=1", "sft.train.eval_interval=2", "sft.train.eval_sequences=4",
        "sft.train.checkpoint_interval=2", "sft.problems=12", "sft.eval_problems=3", "sft.eval_max_tokens=12",
        "sft.tasks=math:1,code:1,instructions:1", "sft.reasoning_off=0.25", "sft.reasoning_truncated=0",
        "sft.train.mtp_depths=2", "serve.compile=false"]
CHATS = [{"messages": [{"role": "user", "content": f"Say {word}."},
                       {"role": "assistant", "reasoning_content": f"The word is {word}.", "content": word}]}
         for word in ("sky", "sun", "grass", "tree", "blue", "green", "sea", "rain")]


def settings(*extra: str) -> list[str]:
    return [arg for item in [*FAST, *extra] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny checkpoint with MTP and the session tokenizer (n3's chat template)."""
    path = tmp_path_factory.mktemp("sft") / "base"
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=1.0, max_position_embeddings=512), path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "sft"
    process = n3_process("sft", "-c", str(base), "--out", str(run), *settings())
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run, out


def test_run_folder_report_and_metrics(finished):
    run, out = finished
    for words in ("Held-out accuracy", "before", "after", "efficiency", "checkpoint"):
        assert words in out, words
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[1] and len(records[0]["mtp"]) == 2
    report = json.loads((run / "sft.json").read_text())
    after = {(r["domain"], r["reasoning"]) for r in report["tasks_after"]["results"]}
    assert after == {(d, m) for d in ("math", "code", "instructions") for m in ("on", "off")}
    assert report["data"]["packing"]["samples"] == 36  # 12 problems in each of 3 domains, 3 of each with reasoning off
    assert report["data"]["reasoning_modes"] == {"on": 27, "off": 9, "truncated": 0, "without": 0}
    assert (run / "tasks-before.json").is_file() and (run / "cpu.toml").is_file()
    trainer = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert trainer["stage"] == "sft" and trainer["data_fingerprint"]


def test_the_checkpoint_loads_in_transformers_with_its_chat_template(finished, tokenizer):
    transformers = pytest.importorskip("transformers")
    checkpoint = n3.resolve_checkpoint(finished[0])
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
        tokenizer.encode_chat(messages)
    model = transformers.NemotronHForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([tokenizer.encode_chat(messages)])
    with torch.no_grad():
        assert (n3.from_pretrained(checkpoint)(ids) - model(ids).logits).abs().max() < 1e-4


def test_sigkill_then_resume_repeats_the_losses_bitwise(base, tmp_path):
    args = ["-c", str(base), *settings("sft.train.steps=8")]
    keys = ("step", "loss", "ce", "mtp", "grad_norm", "lr", "maxvio", "val_loss")
    assert_killed_and_resumed_repeats("sft", args, tmp_path, first=2, last=8, keys=keys)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(base, tmp_path, strategy):
    args = ["-c", str(base), *settings("sft.train.steps=2", f"parallel.strategy={strategy}", "sft.eval_problems=1")]
    single = n3_process("sft", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    two = torchrun("sft", "--out", str(tmp_path / "two"), *args)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, both, strict=True):
        for key in ("loss", "ce", "grad_norm", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-4, (key, a, b)


def test_lora_trains_adapters_and_saves_merged_plain_weights(base, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    cfg = load("cpu", [*FAST, "sft.lora.rank=4", "sft.train.lr=1e-2", "sft.train.steps=2", "sft.val_fraction=0"])
    result = sft(cfg, tmp_path / "lora", base, parse_chat_sources([str(data)]))
    assert result.before is None and result.data.train.stats.samples == 8
    before, after = n3.from_pretrained(base).state_dict(), n3.from_pretrained(result.checkpoint).state_dict()
    assert set(before) == set(after)  # a plain checkpoint: no adapter weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(re.search(r"(q|k|v|o|in|out)_proj|shared_experts", k) for k in changed)
    assert not any("experts.up_proj" in k and "shared" not in k for k in changed)  # routed experts are frozen


def test_chat_files_train_with_reasoning_modes(base, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHATS * 5))
    status, out, err = cli(capsys, "sft", "-c", str(base), "--data", f"words={data}", "--out", str(tmp_path / "run"),
                           "--train-on", "final", *settings("sft.reasoning_off=0.5", "sft.train.steps=1"))
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "sft.json").read_text())
    assert report["data"]["reasoning_modes"]["off"] == 20 and report["tasks_after"] is None
    assert report["data"]["sources"][0]["name"] == "words"
    # Resumed without --data, the run goes on with the files it started with (one more step).
    status, out, err = cli(capsys, "sft", "--resume", "--out", str(tmp_path / "run"), "--set", "sft.train.steps=2")
    assert status == 0, err
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_dry_run_plans_without_training(base, tmp_path, capsys):
    status, out, err = cli(capsys, "sft", "-c", str(base), "--dry-run", "--lora", "8", *settings())
    assert status == 0, err
    assert "Parameters" in out and "efficiency" in out and "LoRA rank 8" in out and not (tmp_path / "runs").exists()


def test_bad_input_is_a_clear_error(base, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run without --out would go
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    robot = tmp_path / "robot.jsonl"
    robot.write_text(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors.index.json", *[p.name for p in base.glob("*.safetensors")]):
        (no_tokenizer / name).write_bytes((base / name).read_bytes())
    raising = tmp_path / "raising"
    raising.mkdir()
    for file in base.iterdir():
        (raising / file.name).write_bytes(file.read_bytes())
    config = json.loads((raising / "tokenizer_config.json").read_text())
    template = "{% if messages[-1].content == 'bad' %}{{ raise_exception('no bad turns') }}{% endif %}ok"
    (raising / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    bad_turn = tmp_path / "bad-turn.jsonl"
    bad_turn.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                                 {"role": "assistant", "content": "bad"}]}) + "\n")
    pretrain_like = tmp_path / "not-sft"
    (pretrain_like / "checkpoints").mkdir(parents=True)
    unmarked = tmp_path / "unmarked"  # a template that writes only the assistant's words: no turn can be told apart
    unmarked.mkdir()
    for file in base.iterdir():
        (unmarked / file.name).write_bytes(file.read_bytes())
    only_answers = "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
    (unmarked / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": only_answers}))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                 for i in range(3)))
    cases = [
        (["-c", str(base), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["-c", str(base), "--data", str(bad_rows)], r"bad.jsonl:2: row: has no 'messages'"),
        (["-c", str(base), "--data", str(robot)], r"robot.jsonl:1: messages\[0\].role: must be one of"),
        (["-c", str(raising), "--data", str(bad_turn)], r"bad-turn.jsonl:1: .*fails on this conversation.*no bad turns"),
        (["-c", str(no_tokenizer)], "has no tokenizer.json"),
        (["-c", str(base), "--set", "sft.lora.rank=2", "--set", "sft.lora.targets=mixer.gate_proj"],
         "'mixer.gate_proj' matches no linear layer"),
        (["--resume", "--out", str(pretrain_like)], "not a run folder|not an SFT run"),
        (["-c", str(base), "--train-on", "everything"], "sft.train_on.*must be one of assistant | final | all"),
        (["-c", str(base), "--out", str(finished[0])], "holds a run already"),
        (["-c", str(base), "--weight", "a=2"], "--weight names --data sources"),
        (["-c", str(unmarked), "--data", str(tmp_path / "chats.jsonl")], "every token takes a loss"),
        (["-c", str(base), "--data", str(questions)], "no token of the packed data takes a loss"),
    ]
    for args, message in cases:
        status, out, err = cli(capsys, "sft", *args, *settings())
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "runs").exists()  # every error came before a run folder was made


def test_newest_pretrain_run_is_the_default(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "sft", "--dry-run", *settings())
    assert status == 0 and "no checkpoint given" in out  # nothing under runs/: the plan of the preset's shape
    status, out, err = cli(capsys, "sft", *settings())
    assert status == 2 and "no run under runs/ is an n3 pretrain run" in err


def test_a_transformers_checkpoint_in_the_released_template(base, tmp_path, capsys):
    """A checkpoint transformers wrote (its own key names), with a released Nemotron 3 chat template: n3 trains in
    that template, and what it writes transformers loads with the same template."""
    transformers = pytest.importorskip("transformers")
    from tests.test_chat import released_templates

    plain = tmp_path / "plain"  # transformers' NemotronH has no MTP head: it would drop one
    n3.save_pretrained(random_model(vocab_size=Tokenizer.load(base).vocab_size, scale=1.0, pattern="M*EM-",
                                    max_position_embeddings=512), plain)
    hub = tmp_path / "hub"
    transformers.NemotronHForCausalLM.from_pretrained(plain).save_pretrained(hub)
    template = released_templates()["nemotron_3_nano"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hub / name).write_bytes((base / name).read_bytes())
    config = json.loads((hub / "tokenizer_config.json").read_text())
    (hub / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    status, out, err = cli(capsys, "sft", "-c", str(hub), "--data", str(data), "--out", str(tmp_path / "run"),
                           *settings("sft.train.steps=1", "sft.val_fraction=0"))
    assert status == 0, err
    checkpoint = n3.resolve_checkpoint(tmp_path / "run")
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert theirs.chat_template == template
    messages = CHATS[0]["messages"]
    ours = Tokenizer.load(checkpoint).encode_chat(messages, add_generation_prompt=False)
    assert theirs.apply_chat_template(messages, return_dict=False) == ours
