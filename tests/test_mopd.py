"""`n3 mopd`: the bounded-staleness pipeline (staleness 0 is the synchronous loop; the bound holds; errors surface),
the distillation advantage and behaviour correction, teachers in-process and on `n3 serve` (the same log-probs;
another tokenizer refused), and the stage end to end on a tiny model: run folder, curves, SIGKILL-resume bit for bit,
default teachers, bad input."""

import json
import random
import threading
import time

import pytest
import torch

import model as n3
from model.errors import UserError
from stages.rollout.batches import Trajectory, pack_trajectories
from stages.rollout.learner import PolicyLossSettings, PolicyObjective, Sampling, accumulate_policy_gradients
from stages.rollout.losses import clipped_policy_loss, token_weights
from stages.rollout.pipeline import StalenessError, run_pipeline
from stages.runtime.distributed import World
from stages.runtime.metrics import read_metrics
from tests.test_engine import random_model
from tests.test_pretrain import assert_killed_and_resumed_repeats
from tests.test_rlvr import PARITY, run_n3

FAST = ["mopd.train.steps=3", "mopd.prompts_per_step=4", "mopd.group_size=2", "mopd.max_tokens=8",
        "mopd.train.seq_len=64", "mopd.train.micro_batch_size=4", "mopd.train.checkpoint_interval=1",
        "mopd.train.lr=1e-3", "mopd.reasoning=false", "mopd.engine_batch=8", "mopd.warmup.steps=2",
        "mopd.warmup_prompts=8", "mopd.warmup.seq_len=64", "mopd.warmup.micro_batch_size=2",
        "mopd.warmup.global_batch_size=2", "mopd.warmup.lr=1e-3", "mopd.asynchronous=true",
        "serve.compile=false"]


def settings(*extra: str) -> list[str]:
    return [arg for item in [*FAST, *extra] for arg in ("--set", item)]


# --- the pipeline ---------------------------------------------------------------------------------------------------
class Toy:
    """A learner whose state is a number: each update mixes the batch, and batch k's content depends on the policy
    version that generated it, so a different version order gives a different result."""

    def __init__(self, slow_learner: bool = False):
        self.state, self.version, self.slow = 1.0, 0, slow_learner
        self.published: list[int] = []
        self.lock = threading.Lock()

    def generate(self, step):
        with self.lock:
            version, state = self.version, self.state
        time.sleep(random.random() * 0.002)
        return version, (step, state)

    def score(self, step, generated):
        return generated[0] * 0.5 + generated[1]

    def learn(self, step, version, scored):
        time.sleep((0.01 if self.slow else 0.0) + random.random() * 0.002)
        with self.lock:
            self.state = self.state * 0.9 + scored * 0.1
            self.version = step + 1
        return {"state": self.state}


def test_staleness_zero_is_the_synchronous_loop():
    sync = [r["state"] for r in run_pipeline(range(12), *_fns(Toy()), max_staleness=0, asynchronous=False)]
    threaded = [r["state"] for r in run_pipeline(range(12), *_fns(Toy()), max_staleness=0, asynchronous=True)]
    assert threaded == sync
    staler = [r["state"] for r in run_pipeline(range(12), *_fns(Toy(slow_learner=True)), max_staleness=2)]
    assert staler != sync  # the toy does see the versions: the equality above says something


@pytest.mark.parametrize("bound", [1, 3])
def test_staleness_never_exceeds_the_bound_and_reaches_it(bound):
    records = list(run_pipeline(range(20), *_fns(Toy(slow_learner=True)), max_staleness=bound))
    assert [r["staleness"] for r in records][-5:] == [bound] * 5  # a slow learner: generation runs ahead, to the bound
    assert max(r["staleness"] for r in records) == bound
    assert all(r["policy_version"] == step - r["staleness"] for step, r in enumerate(records))


def test_a_worker_error_surfaces_and_a_stale_batch_is_refused():
    toy = Toy()

    def broken(step, generated):
        if step == 2:
            raise RuntimeError("teacher down")
        return toy.score(step, generated)

    with pytest.raises(RuntimeError, match="teacher down"):
        list(run_pipeline(range(5), toy.generate, broken, toy.learn, max_staleness=1))
    with pytest.raises(StalenessError):  # a generator that ignores the learner's version
        list(run_pipeline(range(5), lambda step: (0, (step, 1.0)), toy.score, toy.learn, max_staleness=1,
                          asynchronous=False))


def test_each_stage_computes_with_its_own_threads():
    seen = {}

    def generate(step):
        seen["generate"] = torch.get_num_threads()
        return step, None

    def learn(step, version, scored):
        seen["learn"] = torch.get_num_threads()
        return {}

    before = torch.get_num_threads()
    list(run_pipeline(range(2), generate, lambda step, g: seen.setdefault("score", torch.get_num_threads()), learn,
                      max_staleness=0, threads=1))
    assert seen == {"generate": 1, "score": 1, "learn": 1} and torch.get_num_threads() == before


def _fns(toy: Toy):
    return toy.generate, toy.score, toy.learn


# --- the objective --------------------------------------------------------------------------------------------------
def test_the_advantage_is_the_teacher_less_the_proximal_policy():
    """With teacher log-probs, each token's advantage is log pi_T - sg(log pi_prox) (plus the trajectory's outcome
    term): the gradient is that of -sum w A log pi_theta."""
    torch.manual_seed(0)
    policy = PolicyObjective(random_model(vocab_size=32, scale=2.0)).train()
    gen = torch.Generator().manual_seed(1)
    trajectories = [Trajectory([1, 2, 3], [int(t) for t in torch.randint(4, 32, (n,), generator=gen)],
                               [-1.0] * n, [True] * n, 0.25 * i, "d", i,
                               teacher_logp=torch.randn(n, generator=gen).tolist())
                    for i, n in enumerate((4, 6))]
    weights = [token_weights([len(t.token_ids)], "token", 10, 2) for t in trajectories]
    [batch] = pack_trajectories(trajectories, weights, 32, 2, 0)
    world = World(0, 1, 0, torch.device("cpu"))
    stats, _ = accumulate_policy_gradients(policy, [batch], Sampling(), PolicyLossSettings(), "fp32", world)
    got = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    logp = policy(batch.input_ids, batch.targets, batch.seq_idx, Sampling())["logp"]
    advantage = batch.gather(batch.advantages) + batch.gather(batch.teacher_logp) - logp.detach()
    (-(batch.gather(batch.weights) * advantage * logp).sum()).backward()
    expected = [p.grad for p in policy.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    kl = (logp.detach() - batch.gather(batch.teacher_logp)).mean().item()
    assert stats["reverse_kl"] == pytest.approx(kl, abs=1e-5)


def test_outcome_mixing_adds_the_reward_less_the_domain_mean():
    from stages.rollout.losses import outcome_advantages

    assert outcome_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 0.5).tolist() == [0.25, -0.25, -0.25, 0.25]
    assert outcome_advantages(torch.tensor([1.0, 0.0]), 0.0).tolist() == [0.0, 0.0]


def test_the_behaviour_correction_caps_or_masks():
    logp = torch.zeros(3, requires_grad=True)
    behaviour = torch.log(torch.tensor([1.0, 0.5, 0.1]))  # corrections 1, 2 and 10
    args = dict(old_logp=logp.detach(), advantages=torch.ones(3), weights=torch.ones(3), behaviour_logp=behaviour,
                tis_cap=5.0)
    capped, sums = clipped_policy_loss(logp, **args)
    assert capped.item() == pytest.approx(-(1 + 2 + 5)) and sums["behaviour_masked"].item() == 1
    masked, _ = clipped_policy_loss(logp, **args, tis_mode="mask")
    assert masked.item() == pytest.approx(-(1 + 2))


# --- teachers -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A student and a teacher (two tiny random models with the session tokenizer) and the user environment."""
    folder = tmp_path_factory.mktemp("mopd")
    for name, seed in (("student", 0), ("teacher", 1)):
        n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, seed=seed, scale=2.0,
                                        max_position_embeddings=256), folder / name)
        tokenizer.save(folder / name)
    (folder / "toyenv.py").write_text(PARITY)
    return folder


def _sequences(tokenizer):
    prompts = [tokenizer.encode(f"Say {i} to the teacher.") for i in range(5)]
    return [(p, tokenizer.encode(" reply" * (i + 1))) for i, p in enumerate(prompts)]


def test_a_checkpoint_teacher_packs_and_scores_each_reply_as_alone(base, tokenizer):
    from presets import load
    from stages.rollout.teachers import load_teacher

    cfg = load("cpu", ["mopd.train.seq_len=48", "mopd.train.micro_batch_size=2"])
    teacher = load_teacher("parity", str(base / "teacher"), base / "student", tokenizer, cfg, print)
    sequences = _sequences(tokenizer)
    packed = teacher.logprobs(sequences)
    model = n3.from_pretrained(base / "teacher", dtype=torch.float32)
    for (prompt, reply), got in zip(sequences, packed):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply]))[0]
        expected = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1].gather(
            1, torch.tensor(reply)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_a_server_teacher_gives_the_same_logprobs_and_another_tokenizer_is_refused(base, tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model.engine import Engine, EngineConfig
    from model.tokenizer import SPECIAL_TOKENS, Tokenizer
    from presets import load
    from stages.rollout.teachers import load_teacher
    from stages.serve.app import Server
    from tests.test_serve import serving_in_process

    cfg = load("cpu", ["mopd.engine_batch=4"])
    checkpoint = base / "teacher"
    local = load_teacher("parity", str(checkpoint), base / "student", tokenizer, cfg, print)
    server = Server("teacher", lambda: Engine(n3.from_pretrained(checkpoint), tokenizer,
                                              EngineConfig(max_batch=4, max_len=128)), checkpoint)
    with serving_in_process(server) as url:
        remote = load_teacher("parity", url, base / "student", tokenizer, cfg, print)
        sequences = _sequences(tokenizer)
        for a, b in zip(remote.logprobs(sequences), local.logprobs(sequences)):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
        other = HFTokenizer(models.BPE())
        other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        other.decoder = decoders.ByteLevel()
        other.train_from_iterator(["a different corpus, with other merges " * 50],
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        stranger = Tokenizer(other)
        stranger.save(tmp_path / "stranger")
        with pytest.raises(UserError, match="spells tokens differently"):
            load_teacher("parity", url, tmp_path / "stranger", stranger, cfg, print)
    with pytest.raises(UserError, match="different tokenizer"):
        load_teacher("parity", str(checkpoint), tmp_path / "stranger", stranger, cfg, print)


def test_the_stage_distills_from_a_teacher_on_n3_serve(base, tokenizer, tmp_path, monkeypatch):
    """The same pipeline with the teacher behind an HTTP endpoint: the run trains, its warmup replies come from the
    server, and the reverse KL it logs is the in-process teacher's to rounding."""
    from model.engine import Engine, EngineConfig
    from presets import load
    from stages.mopd import mopd
    from stages.serve.app import Server
    from tests.test_serve import serving_in_process

    monkeypatch.chdir(base)
    monkeypatch.syspath_prepend(str(base))
    checkpoint = base / "teacher"
    server = Server("teacher", lambda: Engine(n3.from_pretrained(checkpoint), tokenizer,
                                              EngineConfig(max_batch=8, max_len=128)), checkpoint)
    cfg = load("cpu", [*FAST, "mopd.train.steps=2", "mopd.envs=toyenv:Parity", "mopd.max_staleness=0"])
    with serving_in_process(server) as url:
        remote = mopd(cfg, tmp_path / "remote", base / "student", {"parity": url})
    mopd(cfg, tmp_path / "local", base / "student", {"parity": str(checkpoint)})
    assert remote.teachers == {"parity": url} and remote.steps == 2
    far, near = read_metrics(tmp_path / "remote" / "metrics.jsonl"), read_metrics(tmp_path / "local" / "metrics.jsonl")
    assert [r["reverse_kl/parity"] for r in far] == pytest.approx([r["reverse_kl/parity"] for r in near], abs=1e-3)


# --- the stage ------------------------------------------------------------------------------------------------------
TEACHER = ["--env", "toyenv:Parity", "--teacher", "parity=teacher"]


@pytest.fixture(scope="module")
def finished(base):
    status, out, err = run_n3(base, "mopd", "-c", "student", *TEACHER, "--out", "run", "--cycles", "2",
                              *settings("mopd.train.steps=2"))
    assert status == 0, err
    return base / "run", out


def test_run_folder_curves_and_checkpoints(finished):
    run, out = finished
    assert "MOPD" in out and "parity teacher" in out
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["cycle"]) for r in records] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    for key in ("reverse_kl/parity", "reverse_kl", "reward/parity", "accuracy/parity", "length/parity",
                "token_mult_prob_error", "staleness", "policy_version", "grad_norm", "lr", "tokens_per_s"):
        assert key in records[-1], key
    assert all(0 <= r["staleness"] <= 2 for r in records)
    assert set(records[-1]["seconds"]) == {"generate", "score", "update", "step"}
    assert (run / "reverse_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cycle, start in ((1, "student"), (2, "checkpoints/step-00000002")):  # each cycle warms up what came before
        assert (run / f"warmup-{cycle}" / "data" / "parity.jsonl").is_file()
        warm = json.loads((run / f"warmup-{cycle}" / "checkpoints" / "step-00000002" / "trainer.json").read_text())
        assert warm["stage"] == "mopd-warmup" and warm["start"].endswith(start)
    trainer = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert trainer["stage"] == "mopd" and trainer["cycle"] == 2
    assert trainer["start"].endswith("warmup-2/checkpoints/step-00000002")
    summary = json.loads((run / "mopd.json").read_text())
    assert summary["teachers"] == {"parity": "teacher"} and summary["steps"] == 4
    before = n3.from_pretrained(run.parent / "student")
    after = n3.from_pretrained(run / "checkpoints" / "step-00000004")
    assert all(torch.equal(a, b) for a, b in zip(before.mtp.parameters(), after.mtp.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before.model.parameters(), after.model.parameters()))


def test_sigkill_resume_repeats_the_run(base, tmp_path, monkeypatch):
    monkeypatch.chdir(base)  # the user module and the teacher are found from the current directory
    args = ["-c", str(base / "student"), "--env", "toyenv:Parity", "--teacher", f"parity={base / 'teacher'}",
            *settings("mopd.max_staleness=0", "mopd.warmup.steps=0")]
    assert_killed_and_resumed_repeats("mopd", args, tmp_path, 1, 3, ("reverse_kl", "loss", "grad_norm"))


def test_default_teachers_are_the_newest_single_domain_rlvr_runs(tmp_path, monkeypatch):
    from n3cli.mopd import _teachers

    def fake_run(name, envs):
        step = tmp_path / "runs" / name / "checkpoints" / "step-00000001"
        step.mkdir(parents=True)
        (step / "config.json").write_text("{}")
        (step / "trainer.json").write_text(json.dumps({"stage": "rlvr", "step": 1}))
        (tmp_path / "runs" / name / "rlvr.json").write_text(json.dumps({"environments": envs}))

    monkeypatch.chdir(tmp_path)
    fake_run("cpu-rlvr", ["math", "code"])
    fake_run("cpu-rlvr-math", ["math"])
    with pytest.raises(UserError, match="n3 rlvr --env code"):
        _teachers([], ["math", "code"], resume=False)
    fake_run("cpu-rlvr-code", ["code"])
    assert _teachers(["math=elsewhere"], ["math", "code"], resume=False) == {
        "math": "elsewhere", "code": "runs/cpu-rlvr-code"}


@pytest.mark.parametrize("args,message", [
    (["--teacher", "parity=teacher", "--teacher", "math=teacher"], "a teacher for math, which no environment"),
    (["--teacher", "parity=http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    (["--teacher", "parity=nosuch"], "nosuch does not exist"),
    (["--teacher", "parity=teacher", "--max-staleness", "-1"], "--max-staleness must be at least 0"),
    (["--teacher", "parity=teacher", "--weight", "parity=0"], "weights must be positive"),
    (["--teacher", "parity"], "give DOMAIN=CHECKPOINT_OR_URL"),
])
def test_bad_input_is_one_line_and_exit_2(base, args, message):
    status, out, err = run_n3(base, "mopd", "-c", "student", "--env", "toyenv:Parity", "--out", "bad", *settings(),
                              *args)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (base / "bad" / "checkpoints").exists()


def test_async_pipeline_is_what_the_stage_runs_under_torchrun(base):
    """Two ranks, each with its own engine and teacher, the learner DDP: the steps and curves come out."""
    from tests.test_pretrain import torchrun

    run = base / "torchrun"
    process = torchrun("mopd", "-c", "student", *TEACHER, "--out", str(run),
                       *settings("mopd.train.steps=2", "mopd.warmup.steps=1", "mopd.warmup.global_batch_size=4",
                                 "parallel.strategy=ddp"), cwd=base)
    assert process.returncode == 0, process.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
