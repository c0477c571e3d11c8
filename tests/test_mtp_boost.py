"""`n3 mtp-boost`: the chunked KL kernel against the materialised one, hidden-state mixing's choices, the objective
against the loss written out by hand (only the MTP head moves), building an MTP head for a checkpoint without one
(hub naming), and the stage end to end on a tiny model: run folder, figures, resume, --init, bad input."""

import json

import pytest
import torch

import model as n3
from kernels.cross_entropy import IGNORE
from kernels.distill import linear_kl
from model.hybrid import with_mtp_head
from model.tokenizer import Tokenizer
from stages.runtime.distill import MTPDistillObjective, mixed_input
from stages.runtime.losses import head_token_counts, mtp_labels
from stages.runtime.metrics import read_metrics
from tests.test_engine import random_model
from tests.test_rlvr import run_n3


def materialised_kl(student, teacher, weight, temperature):
    log_q = torch.log_softmax(student.double() @ weight.double().T / temperature, -1)
    log_p = torch.log_softmax(teacher.double() @ weight.double().T / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("vocab_chunk", [7, 100, 4096])
def test_linear_kl_equals_the_materialised_kl_and_its_gradient(vocab_chunk):
    torch.manual_seed(0)
    student = torch.randn(45, 16, requires_grad=True)
    teacher, weight = torch.randn(45, 16), torch.randn(100, 16)
    kl = linear_kl(student, teacher, weight, 2.0, vocab_chunk)
    expected = materialised_kl(student, teacher, weight, 2.0)
    assert kl.dtype == torch.float32 and torch.allclose(kl.double(), expected, atol=1e-5)
    upstream = torch.randn(45)
    (grad,) = torch.autograd.grad((kl * upstream).sum(), student)
    (want,) = torch.autograd.grad((expected * upstream.double()).sum(), student)
    assert torch.allclose(grad.double(), want.double(), atol=1e-5)
    assert torch.allclose(linear_kl(teacher, teacher, weight, 2.0, vocab_chunk), torch.zeros(45), atol=1e-5)


def test_linear_kl_is_fp32_under_autocast_and_trains_the_student_alone():
    torch.manual_seed(1)
    student, teacher, weight = torch.randn(8, 16), torch.randn(8, 16), torch.randn(50, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = linear_kl(student, teacher, weight, 1.0)
    assert torch.allclose(kl.double(), materialised_kl(student, teacher, weight, 1.0), atol=1e-5)
    with pytest.raises(ValueError, match="student alone"):
        linear_kl(student, teacher, weight.requires_grad_(), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_kl(student, teacher, weight.detach(), 0.0)


def test_mixing_draws_states_that_read_the_same_tokens():
    """history[j] holds 100 j + position: the input of depth 3 at position i is history[j] at i + 2 - j."""
    b, t, k = 2, 12, 3
    history = [(100 * j + torch.arange(t, dtype=torch.float32)).view(1, t, 1).expand(b, t, 4) for j in range(k)]
    seq_idx = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    drawn = torch.stack([mixed_input(history, seq_idx, torch.Generator().manual_seed(s))[..., 0] for s in range(200)])
    for row in range(b):
        for i in range(t):
            values = set(drawn[:, row, i].tolist())
            allowed = {100 * 2 + i}  # the newest, always
            for j in range(k - 1):
                at = i + k - 1 - j
                if at < t and seq_idx[row, at] == seq_idx[row, i]:
                    allowed.add(100 * j + at)
            assert values == allowed, (row, i, values, allowed)  # each candidate drawn, none other


def objective_batch(vocab: int = 64):
    torch.manual_seed(2)
    ids = torch.randint(0, vocab, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[:, :4] = IGNORE  # a prompt
    labels[:, -1] = IGNORE
    seq_idx = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    return ids, labels, seq_idx


def test_the_objective_is_the_loss_written_out_and_moves_only_the_mtp_head():
    model = random_model(scale=2.0).train()
    depths, temperature = 3, 2.0
    objective = MTPDistillObjective(model, depths, temperature, inputs="recursion")
    ids, labels, seq_idx = objective_batch()
    counts = head_token_counts(labels, depths, seq_idx)
    scales = objective.head_scales(None)
    assert scales == [0.0] + [temperature**2 / depths] * depths
    weights = [s / c for s, c in zip(scales, counts.tolist())] + [0.0]
    out = objective(ids, labels, weights, seq_idx)
    out["loss"].backward()
    # By hand: depth k's logits at i against the backbone's at i + k, where the target is trained and in-document.
    with torch.no_grad():
        h = model.model(ids, seq_idx=seq_idx)
        expected = 0.0
        for k, hk in enumerate(model.mtp_unroll(h, ids, depths, seq_idx), 1):
            valid = mtp_labels(labels, k, seq_idx) != IGNORE
            teacher = torch.roll(h, -k, 1)[valid]
            expected += materialised_kl(hk[valid], teacher, model.lm_head.weight, temperature).sum() / valid.sum()
        expected *= temperature**2 / depths
    assert abs(out["loss"].item() - expected.item()) < 1e-5
    assert out["head_sums"].shape == (1 + depths,)
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("mtp."), name
    assert any(p.grad.abs().sum() > 0 for p in model.mtp.parameters())


def test_mixing_changes_the_inputs_not_the_first_depth():
    model = random_model(scale=2.0).train()
    ids, labels, seq_idx = objective_batch()
    sums = {}
    for inputs in ("recursion", "mixing"):
        torch.manual_seed(3)
        sums[inputs] = MTPDistillObjective(model, 3, 2.0, inputs)(ids, labels, None, seq_idx)["head_sums"]
    assert torch.equal(sums["recursion"][:2], sums["mixing"][:2])  # next-token loss, depth 1: the same input
    assert not torch.equal(sums["recursion"][2:], sums["mixing"][2:])


def test_with_mtp_head_keeps_the_backbone_and_writes_the_hub_naming(tmp_path):
    plain = random_model(pattern="M*EM-", scale=2.0)
    grown = with_mtp_head(plain, "*E")
    assert grown.config.pattern == "M*EM-/*E"
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids), grown(ids))
    attention, moe = grown.mtp.layers
    assert torch.equal(attention.mixer.q_proj.weight, plain.model.layers[1].mixer.q_proj.weight)
    assert torch.equal(moe.mixer.gate.weight, plain.model.layers[2].mixer.gate.weight)
    n3.save_pretrained(grown, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["mtp_hybrid_override_pattern"] == "*E"
    from safetensors import safe_open

    with safe_open(next(tmp_path.glob("*.safetensors")), "pt") as f:
        keys = set(f.keys())
    assert {"mtp.layers.0.eh_proj.weight", "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight",
            "mtp.layers.1.final_layernorm.weight"} <= keys
    loaded = n3.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.mtp.parameters(), grown.mtp.parameters()))
    with pytest.raises(ValueError, match="already"):
        with_mtp_head(grown)


# --- the stage ------------------------------------------------------------------------------------------------------
FAST = ["mtp_boost.prompts=12", "mtp_boost.max_tokens=12", "mtp_boost.eval_prompts=4", "mtp_boost.eval_max_tokens=8",
        "mtp_boost.train.steps=3", "mtp_boost.train.seq_len=96", "mtp_boost.train.micro_batch_size=2",
        "mtp_boost.train.global_batch_size=2", "mtp_boost.train.mtp_depths=3", "mtp_boost.train.lr=1e-2",
        "mtp_boost.train.warmup_steps=0", "mtp_boost.train.checkpoint_interval=2", "mtp_boost.reasoning=false",
        "mtp_boost.engine_batch=8", "serve.compile=false"]


def settings(*extra: str) -> list[str]:
    return [arg for item in [*FAST, *extra] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """Tiny checkpoints with the session tokenizer (n3's chat template): one with an MTP head, one without."""
    folder = tmp_path_factory.mktemp("mtp-boost")
    for name, pattern in (("base", "M*EM-/*E"), ("nano", "M*EM-")):
        n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=2.0, max_position_embeddings=256,
                                        pattern=pattern), folder / name)
        tokenizer.save(folder / name)
    return folder


@pytest.fixture(scope="module")
def finished(base):
    status, out, err = run_n3(base, "mtp-boost", "-c", "base", "--env", "math:1", "--out", "run", *settings())
    assert status == 0, err
    return base / "run", out


def test_run_folder_figures_and_only_the_head_trained(finished):
    run, out = finished
    assert "Acceptance length" in out and "decode speedup" in out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(len(r["mtp"]) == 3 and r["loss"] > 0 for r in records)
    summary = json.loads((run / "mtp-boost.json").read_text())
    for when in ("before", "after"):
        assert len(summary[when]["kl"]) == 3
        for name in ("greedy", "temperature 1"):
            result = summary[when]["acceptance"][name]
            assert [d["depth"] for d in result["per_depth"]] == [1, 2, 3]
            assert result["plain_tokens_per_s"] > 0 and result["best"]["speedup"] > 0
    assert summary["replies"]["train"]["prompts"] == 12 and summary["replies"]["heldout"]["prompts"] == 4
    assert sum(summary["after"]["kl"]) < sum(summary["before"]["kl"])  # lr 1e-2 on 12 replies: the head fits them
    assert (run / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trainer = json.loads((run / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert trainer["stage"] == "mtp-boost"
    before, after = n3.from_pretrained(run.parent / "base"), n3.from_pretrained(run / "checkpoints" / "step-00000003")
    assert all(torch.equal(a, b) for a, b in zip(before.model.parameters(), after.model.parameters()))
    assert torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert not all(torch.equal(a, b) for a, b in zip(before.mtp.parameters(), after.mtp.parameters()))


def test_resume_of_a_finished_run_measures_without_training(finished):
    run, _ = finished
    replies = (run / "replies" / "train.jsonl").read_text()
    status, out, err = run_n3(run.parent, "mtp-boost", "--resume", "--out", "run")
    assert status == 0, err
    assert "(done before)" in out and (run / "replies" / "train.jsonl").read_text() == replies


def test_init_builds_a_head_for_a_checkpoint_without_one(base):
    status, out, err = run_n3(base, "mtp-boost", "-c", "nano", "--init", "--env", "code:1", "--inputs", "recursion",
                              "--out", "grown", *settings("mtp_boost.train.steps=2"))
    assert status == 0, err
    assert "built (--init)" in out
    grown = n3.from_pretrained(base / "grown" / "checkpoints" / "step-00000002")
    assert grown.config.mtp_pattern == "*E"


def test_prompts_from_a_chat_dataset(base):
    """--data: each conversation up to its last assistant turn is a prompt; a hashed share is held out."""
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": "1 2"},
                          {"role": "user", "content": "Again, slower."}, {"role": "assistant", "content": "1 ... 2"}]}
            for i in range(30)]
    (base / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status, out, err = run_n3(base, "mtp-boost", "-c", "base", "--data", "chats.jsonl", "--out", "chat",
                              *settings("mtp_boost.train.steps=1", "mtp_boost.val_fraction=0.3"))
    assert status == 0, err
    summary = json.loads((base / "chat" / "mtp-boost.json").read_text())
    train, heldout = summary["replies"]["train"]["prompts"], summary["replies"]["heldout"]["prompts"]
    assert train == 12 and 1 <= heldout <= 4  # mtp_boost.prompts of the training share, eval_prompts at most
    replies = [json.loads(line) for line in (base / "chat" / "replies" / "train.jsonl").read_text().splitlines()]
    rendered = Tokenizer.load(base / "base").decode(replies[0]["prompt_ids"])
    assert "Again, slower." in rendered and "1 ... 2" not in rendered  # the second user turn, not the last reply


@pytest.mark.parametrize("args, message", [
    (["-c", "nano"], "has no MTP head; pass --init"),
    (["-c", "base", "--init"], "has an MTP head already"),
    (["-c", "base", "--depths", "9"], "mtp_depths (N, the depths distilled) must be 1 to 7"),
    (["-c", "base", "--temperature", "0"], "temperature (T) must be above 0"),
    (["-c", "nano", "--init", "--set", "mtp_boost.init_pattern=M*"], "attention (*) and MoE (E) sublayers only"),
    (["-c", "base", "--inputs", "both"], "mtp_boost.inputs"),
    (["-c", "missing"], "missing"),
])
def test_bad_input_is_one_line_and_exit_2(base, args, message):
    status, out, err = run_n3(base, "mtp-boost", "--out", "bad", *args, *settings())
    assert status == 2, (out, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_under_torchrun(base, strategy):
    """Each rank replies to its share of the prompts; the head trains under DDP or FSDP2, the backbone frozen."""
    from tests.test_pretrain import torchrun

    run = base / f"torchrun-{strategy}"
    process = torchrun("mtp-boost", "-c", "base", "--env", "math:1", "--out", str(run),
                       *settings("mtp_boost.train.steps=2", "mtp_boost.train.micro_batch_size=1",
                                 f"parallel.strategy={strategy}"), cwd=base)
    assert process.returncode == 0, process.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    summary = json.loads((run / "mtp-boost.json").read_text())
    assert summary["replies"]["train"]["prompts"] == 12  # both ranks' shares gathered
    before, after = n3.from_pretrained(base / "base"), n3.from_pretrained(run / "checkpoints" / "step-00000002")
    assert all(torch.equal(a, b) for a, b in zip(before.model.parameters(), after.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before.mtp.parameters(), after.mtp.parameters()))
