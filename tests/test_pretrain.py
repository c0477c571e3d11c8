"""`n3 pretrain` end to end on the tiny shape: a run folder with metrics and checkpoints that transformers loads, a
SIGKILLed run resumed to bitwise the same losses, two gloo processes matching one, and clear errors for bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as n3
from n3cli.main import main
from stages.runtime.corpus import Manifest
from stages.runtime.metrics import read_metrics
from tests.conftest import free_port

N3 = Path(sys.executable).parent / "n3"
TORCHRUN = Path(sys.executable).parent / "torchrun"
FAST = ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_sequences=4",
        "train.warmup_steps=2", "model.vocab_size=320"]


def settings(corpus: Path, *extra: str) -> list[str]:
    return [arg for item in [*FAST, f"data.path={corpus}", *extra] for arg in ("--set", item)]


def torchrun(*args: str, cwd: Path | None = None, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m n3cli ARGS`: two gloo processes (or `processes`), the tests' environment, a
    free port."""
    return subprocess.run([str(TORCHRUN), "--nproc-per-node", str(processes), "--master-port", str(free_port()),
                           "-m", "n3cli", *args], cwd=cwd, capture_output=True, text=True, env=environment(),
                          timeout=300)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `n3 ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def environment() -> dict[str, str]:
    # One thread: these shapes are far too small to gain from two, and a second thread contending with other work
    # on a busy machine slows every op down.
    return {k: v for k, v in os.environ.items() if k != "N3_DEBUG"} | {"OMP_NUM_THREADS": "1"}


def n3_process(*args: str) -> subprocess.Popen:
    env = environment()
    return subprocess.Popen([str(N3), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """A finished 6-step run of the tiny shape, its CLI output, and its folder."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    process = n3_process("pretrain", "--out", str(run), *settings(small_corpus, "train.steps=6",
                         "train.eval_interval=3", "train.checkpoint_interval=3"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run, out


def test_run_folder_metrics_and_report(trained):
    run, out = trained
    for words in ("validation loss", "unigram entropy", "sample", "checkpoint"):
        assert words in out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    last = records[-1]
    assert set(last["maxvio"]) == {"1", "4", "6", "9", "mtp.1"} and all(v >= 1 for v in last["maxvio"].values())
    assert len(last["residual_rms"]) == 10 and len(last["mtp"]) == 2
    assert last["tokens"] == 6 * 4 * 32 and last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1
    assert "val_loss" in records[2] and "val_loss" in last and "val_loss" not in records[3]
    assert records[0]["lr"] < records[1]["lr"] and records[-1]["lr"] < records[2]["lr"]  # warmup, then decay
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000003", "step-00000006"]
    config = json.loads((run / "checkpoints" / "step-00000006" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert (run / "cpu.toml").is_file()


def test_checkpoint_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    checkpoint = n3.resolve_checkpoint(trained[0])  # a run folder means its newest checkpoint
    ours = n3.from_pretrained(checkpoint)
    theirs = transformers.NemotronHForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x * 7")])
    assert ids.shape[1] > 5 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


def assert_killed_and_resumed_repeats(command: str, args: list[str], folder: Path, first: int, last: int,
                                      keys: tuple[str, ...]) -> None:
    """Run `n3 COMMAND ARGS` whole, and again SIGKILLed once its checkpoint of step `first` exists, then resumed:
    both runs' metrics agree bit for bit on `keys`."""
    whole = n3_process(command, "--out", str(folder / "whole"), *args)
    killed = n3_process(command, "--out", str(folder / "killed"), *args)
    checkpoints = folder / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / f"step-{first:08d}").is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    assert not (checkpoints / f"step-{last:08d}").exists()  # it did die mid-run
    resumed = n3_process(command, "--resume", "--out", str(folder / "killed"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err
    expected, got = read_metrics(folder / "whole" / "metrics.jsonl"), read_metrics(folder / "killed" / "metrics.jsonl")
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in expected]


def test_sigkill_then_resume_repeats_the_losses_bitwise(small_corpus, tmp_path):
    args = settings(small_corpus, "train.steps=24", "train.checkpoint_interval=4", "train.eval_interval=8")
    keys = ("step", "loss", "ce", "mtp", "aux", "grad_norm", "lr", "maxvio", "residual_rms", "val_loss")
    assert_killed_and_resumed_repeats("pretrain", args, tmp_path, first=4, last=24, keys=keys)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(small_corpus, tmp_path, strategy):
    args = [*settings(small_corpus, "train.steps=3", "train.eval_interval=3", f"parallel.strategy={strategy}")]
    single = n3_process("pretrain", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    two = torchrun("pretrain", "--out", str(tmp_path / "two"), *args)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(both) == 3
    for a, b in zip(one, both):
        for key in ("loss", "ce", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-4


def test_bad_input_is_a_clear_error(trained, small_corpus, tmp_path, capsys):
    run, _ = trained
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    for shard in (corrupt / "checkpoints" / "step-00000006" / "training_state").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:50])
    garbled = tmp_path / "garbled"
    shutil.copytree(run, garbled)
    (garbled / "checkpoints" / "step-00000006" / "trainer.json").write_text("{not json")
    (tmp_path / "not-a-run").mkdir()
    cases = [
        (["--resume", "--out", str(tmp_path / "not-a-run")], "not a run folder"),
        (["--resume", "--out", str(corrupt)], "cannot read the training state .*corrupt checkpoint"),
        (["--resume", "--out", str(garbled)], "trainer.json is unreadable .* corrupt checkpoint"),
        (["--resume", "--out", str(run), "--preset", "h100"], "drop --preset"),
        (["--out", str(run), *settings(small_corpus)], "holds a run already: pass --resume"),
        (["--out", str(tmp_path / "r1"), *settings(tmp_path)], "not a prepared corpus"),
        (["--out", str(tmp_path / "r2"), *settings(small_corpus, "model.vocab_size=300")],
         "the corpus tokenizer has 320 tokens but the model only 300"),
        (["--out", str(tmp_path / "r3"), *settings(small_corpus, "train.global_batch_size=5")],
         "must be a multiple of train.micro_batch_size"),
    ]
    for args, message in cases:
        status, out, err = cli(capsys, "pretrain", *args)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert re.search(message, err), (message, err)


def test_a_finished_run_resumes_to_its_report(trained, capsys):
    status, out, err = cli(capsys, "pretrain", "--resume", "--out", str(trained[0]))
    assert status == 0 and "complete already" in out and "sample" in out


def test_low_precision_compute_converts_the_model(small_corpus, tmp_path):
    """precision.compute = nvfp4 goes through model.lowp's converter (emulated on a CPU) before training, and the
    converted blocks compile (train.compile; an attention and a MoE block: compiled Mamba blocks are
    test_runtime's, and each kind of block costs its own compilation)."""
    process = n3_process("pretrain", "--out", str(tmp_path / "fp4"), *settings(
        small_corpus, "train.steps=2", "precision.compute=nvfp4", "model.pattern=*E", "train.mtp_depths=0",
        "train.compile=true"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "low precision (emulated)" in " ".join(err.split()) and "nvfp4" in err
    assert "2 blocks compile" in " ".join(err.split())
    losses = [r["loss"] for r in read_metrics(tmp_path / "fp4" / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


def test_without_a_corpus_it_prepares_the_builtin_one(tmp_path):
    """The default job's path: no data.path, so the built-in corpus is prepared into the cache first."""
    args = [arg for item in [*FAST, "train.steps=1", "train.eval_sequences=2"] for arg in ("--set", item)]
    env = environment() | {"N3_CACHE": str(tmp_path / "cache")}
    process = subprocess.run([str(N3), "pretrain", "--out", str(tmp_path / "run"), *args],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr
    corpora = list((tmp_path / "cache" / "corpus").iterdir())
    assert [c.name.endswith("-v320") for c in corpora] == [True]
    assert {s.name for s in Manifest.load(corpora[0]).sources} == {"python-code", "python-docs"}
    assert "validation loss" in process.stdout
