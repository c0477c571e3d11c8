"""`n3 rlvr` end to end on a tiny model with a user environment: the run folder, its metrics and reward curves, a
SIGKILLed run resumed to bitwise the same steps, a step that moves the policy the way its advantages say, and clear
errors for bad input."""

import json
import textwrap

import pytest
import torch

import model as n3
from model.hybrid import build
from stages.rollout.batches import Trajectory, pack_trajectories
from stages.rollout.learner import PolicyLossSettings, PolicyObjective, Sampling, accumulate_policy_gradients
from stages.rollout.losses import token_weights
from stages.runtime.distributed import World
from stages.runtime.metrics import read_metrics
from stages.runtime.optim import build_optimizer
from stages.runtime.loop import apply_gradients
from presets import load
from tests.test_engine import random_model
from tests.test_model import tiny_config
from tests.test_pretrain import assert_killed_and_resumed_repeats, cli, environment

PARITY = textwrap.dedent('''
    from stages.envs import Prompt, Score


    class Parity:
        """Rewards replies of an odd number of characters: a signal a random model's samples vary in."""

        name = "parity"

        def prompts(self, split, count, seed):
            offset = 0 if split == "train" else 10_000
            return [Prompt("parity", [{"role": "user", "content": f"Say {i + offset}."}], {"i": i}, f"{split}{i}")
                    for i in range(count)]

        def score(self, data, completion):
            odd = len(completion) % 2 == 1
            return Score(float(odd), odd, "odd" if odd else "even")


    class Broken:
        name = "broken"
''')
FAST = ["rlvr.train.steps=4", "rlvr.prompts_per_step=3", "rlvr.group_size=4", "rlvr.max_tokens=8",
        "rlvr.train.seq_len=64", "rlvr.train.micro_batch_size=4", "rlvr.train.checkpoint_interval=2",
        "rlvr.train.lr=1e-3", "rlvr.reasoning=false", "rlvr.engine_batch=8", "rlvr.tis_cap=2",
        "serve.compile=false"]


def settings(*extra: str) -> list[str]:
    return [arg for item in [*FAST, *extra] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny checkpoint with the session tokenizer (n3's chat template), and a folder holding the user module."""
    folder = tmp_path_factory.mktemp("rlvr")
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=2.0, max_position_embeddings=256),
                       folder / "base")
    tokenizer.save(folder / "base")
    (folder / "toyenv.py").write_text(PARITY)
    return folder


def run_n3(folder, *args, timeout=300):
    import subprocess

    from tests.test_pretrain import N3

    process = subprocess.run([str(N3), *args], cwd=folder, capture_output=True, text=True, env=environment(),
                             timeout=timeout)
    return process.returncode, process.stdout, process.stderr


@pytest.fixture(scope="module")
def finished(base):
    status, out, err = run_n3(base, "rlvr", "-c", "base", "--env", "toyenv:Parity", "--out", "run", *settings())
    assert status == 0, err
    return base / "run", out


def test_run_folder_metrics_and_curves(finished):
    run, out = finished
    assert "RL on parity" in out and "checkpoint" in out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "reward/parity", "accuracy/parity", "length/parity", "entropy", "clip_low",
                "clip_high", "zero_variance", "ratio", "ratio_max", "token_mult_prob_error", "mismatch_kl",
                "grad_norm", "lr", "tokens_per_s", "generated_tokens"):
        assert key in records[-1], key
    assert set(records[-1]["seconds"]) == {"generate", "score", "logprobs", "update", "step"}
    # The engine samples with the learner's weights (handed over after every step): they agree to rounding.
    assert all(abs(r["token_mult_prob_error"] - 1) < 1e-3 for r in records if r["tokens"] > 1)
    assert (run / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "rlvr.json").read_text())
    assert summary["environments"] == ["parity"] and summary["steps"] == 4
    trainer = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert trainer["stage"] == "rlvr"
    # The MTP head is not RL's to train: it leaves as it came.
    before, after = n3.from_pretrained(run.parent / "base"), n3.from_pretrained(run / "checkpoints" / "step-00000004")
    assert all(torch.equal(a, b) for a, b in zip(before.mtp.parameters(), after.mtp.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before.model.parameters(), after.model.parameters()))


def test_sigkill_resume_repeats_the_run(base, tmp_path):
    args = ["-c", str(base / "base"), "--env", "toyenv:Parity", *settings("rlvr.train.steps=3",
                                                                          "rlvr.train.checkpoint_interval=1")]
    import os

    cwd = os.getcwd()
    os.chdir(base)  # the user module is imported from the current directory
    try:
        assert_killed_and_resumed_repeats("rlvr", args, tmp_path, 1, 3, ("reward", "loss", "grad_norm", "entropy"))
    finally:
        os.chdir(cwd)


def test_a_step_follows_the_advantages():
    """One update raises the log-probs of a reply with a positive advantage and lowers one with a negative."""
    torch.manual_seed(0)
    policy = PolicyObjective(build(tiny_config(initializer_range=0.2))).train()
    optimizer = build_optimizer(policy, load("cpu").rlvr.train)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    good = Trajectory([1, 2, 3], [4, 5, 6], [-1.0] * 3, [True] * 3, 1.0, "toy", 0)
    bad = Trajectory([1, 2, 3], [7, 8, 9], [-1.0] * 3, [True] * 3, -1.0, "toy", 0)
    batches = pack_trajectories([good, bad], [token_weights([3], "token", 6, 2)] * 2, 16, 2, 0)
    world = World(0, 1, 0, torch.device("cpu"))

    def logps():
        with torch.no_grad():
            b = batches[0]
            return policy(b.input_ids, b.targets, b.seq_idx, Sampling())["logp"].view(2, 3).sum(1)

    start = logps()
    _, load_ = accumulate_policy_gradients(policy, batches, Sampling(), PolicyLossSettings(), "fp32", world)
    apply_gradients(policy, optimizer, load("cpu").rlvr.train, load_)
    end = logps()
    assert end[0] > start[0] and end[1] < start[1]


@pytest.mark.parametrize("args,message", [
    (["--env", "nosuch"], "unknown environment 'nosuch'"),
    (["--env", "toyenv:Broken"], "toyenv:Broken"),
    (["--env", "toyenv:Parity", "--set", "rlvr.group_size=1"], "rlvr.group_size must be at least 2"),
    (["--env", "math=missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_is_one_line_and_exit_2(base, args, message):
    status, out, err = run_n3(base, "rlvr", "-c", "base", "--out", "bad", *settings(), *args)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (base / "bad" / "checkpoints").exists()


def test_resume_of_a_single_domain_run_reads_its_own_folder(tmp_path, monkeypatch, capsys):
    """`n3 rlvr --env math --resume` continues runs/cpu-rlvr-math (where `n3 rlvr --env math` writes), not the
    unified run's folder."""
    monkeypatch.chdir(tmp_path)
    status, _, err = cli(capsys, "rlvr", "--env", "math", "--resume")
    assert status == 2 and "runs/cpu-rlvr-math is not a run folder" in err, err


def test_a_checkpoint_without_a_chat_template_is_refused(base, tmp_path, capsys):
    plain = tmp_path / "plain"
    n3.save_pretrained(random_model(), plain)
    status, _, err = cli(capsys, "rlvr", "-c", str(plain), "--env", "math", "--out", str(tmp_path / "r"))
    assert status == 2 and "tokenizer" in err


def test_rollouts_from_n3_serve_follow_the_learner(base, tokenizer, tmp_path, monkeypatch):
    """With rlvr.server the replies come from an n3 serve, which reloads the learner's weights after every step:
    its weights version counts the steps, and the run trains as the in-process one does."""
    from model.engine import Engine, EngineConfig
    from stages.rlvr import rlvr
    from stages.serve.app import Server
    from tests.test_serve import get, serving_in_process

    monkeypatch.chdir(base)
    monkeypatch.syspath_prepend(str(base))
    checkpoint = base / "base"
    server = Server("tiny", lambda: Engine(n3.from_pretrained(checkpoint), tokenizer, EngineConfig(max_batch=8,
                                                                                                   max_len=64)),
                    checkpoint)
    with serving_in_process(server) as url:
        cfg = load("cpu", [*FAST, "rlvr.train.steps=2", "rlvr.envs=toyenv:Parity", f"rlvr.server={url}"])
        result = rlvr(cfg, tmp_path / "run", checkpoint)
        assert get(url + "/get_model_info")[1]["weights_version"] == 2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and result.environments == ["parity"]
    assert all(abs(r["token_mult_prob_error"] - 1) < 1e-3 for r in records if r["tokens"] > 1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_under_torchrun(base, strategy):
    """Each rank samples its share of the prompts in its own engine; the learner is DDP or FSDP2."""
    from tests.test_pretrain import torchrun

    run = base / f"torchrun-{strategy}"
    process = torchrun("rlvr", "-c", "base", "--env", "toyenv:Parity", "--out", str(run),
                       *settings("rlvr.train.steps=2", f"parallel.strategy={strategy}"), cwd=base)
    assert process.returncode == 0, process.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward/parity"] is not None and records[0]["generated_tokens"] > 0
