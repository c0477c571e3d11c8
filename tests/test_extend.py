"""`n3 extend`: the schedule of long and short iterations, rows that a resumed or distributed run draws alike, the long
data (retrieval documents, held-out packages), the loss by position, the activation plan against what autograd saves,
activation checkpointing, and the stage end to end: its report, a SIGKILLed run resumed bitwise, two context-parallel
gloo processes matching one, and clear errors for bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import model as n3
from kernels.cross_entropy import IGNORE
from model.checkpoint import read_config
from model.tokenizer import Tokenizer
from presets import load
from stages.extend import starting_min_lr
from stages.extend.data import Documents, ExtendBatches, Retrieval, filler_vocabulary
from stages.extend.positions import bucket_edges, loss_by_position
from stages.plan import activations_per_token, saved_per_token
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import read_metrics
from stages.runtime.progress import Quiet
from tests.test_engine import random_model
from tests.test_pretrain import assert_killed_and_resumed_repeats, cli, n3_process, torchrun

FAST = ["extend.train.seq_len=2048", "extend.short_seq_len=512", "extend.short_fraction=0.34",
        "extend.train.micro_batch_size=1", "extend.train.global_batch_size=2", "extend.train.steps=3",
        "extend.train.eval_interval=3", "extend.train.checkpoint_interval=3", "extend.train.mtp_depths=2",
        "extend.eval_documents=1", "extend.ruler_lengths=2048", "extend.ruler_samples=1", "extend.eval_sequences=4",
        "extend.data=corpus", "extend.weights=", "serve.compile=false"]


class Stream:
    """A long source whose rows count up from a random start: rows are told apart by their first token."""

    def row(self, rng, length):
        start = int(rng.integers(3, 1000))
        return np.arange(start, start + length) % 300 + 3


def batches(rank=0, world=1, short_fraction=0.25, masking=True):
    return ExtendBatches([Stream()], [], Stream(), seq_len=64, short_len=16, short_fraction=short_fraction, rows=4,
                         micro=2, bos_id=1, eos_id=2, masking=masking, rank=rank, world=world, seed=5)


def test_iterations_are_all_long_or_all_short_with_the_same_tokens_in_the_set_ratio():
    source = batches(short_fraction=0.25)
    kinds = []
    for _ in range(40):
        micro = source.next_step()
        shapes = {tuple(mb.input_ids.shape) for mb in micro}
        assert sum(mb.input_ids.numel() for mb in micro) == 4 * 64  # constant tokens per iteration
        assert len(shapes) == 1 and shapes.pop() in {(2, 64), (8, 16)}  # never mixed
        kinds.append(source.phase())
        assert (micro[0].input_ids.shape[1] == 16) == (kinds[-1] == "short")
    assert kinds.count("short") == 10 and "short" not in kinds[:3]  # 25%, spread evenly


def test_rows_depend_on_seed_step_and_row_only_so_resume_and_ranks_draw_alike():
    whole = batches()
    steps = [whole.next_step() for _ in range(5)]
    resumed = batches()
    resumed.load_state_dict({"step": 3})
    assert torch.equal(resumed.next_step()[0].input_ids, steps[3][0].input_ids)
    ranks = [batches(rank=r, world=2) for r in (0, 1)]
    for step in steps:
        mine = [b.next_step() for b in ranks]
        # Micro-batch m of rank r holds rows (m * world + r) * micro..., as runtime.batches.PackedBatches.
        together = torch.cat([mine[r][m].input_ids for m in range(len(mine[0])) for r in (0, 1)])
        assert torch.equal(together, torch.cat([mb.input_ids for mb in step]))


def test_document_masking_starts_a_document_at_every_bos():
    class TwoDocuments:
        def row(self, rng, length):
            half = length // 2
            return np.array([1, *range(3, 3 + half - 2), 2, 1, *range(3, 3 + length - half - 1)])

    masked = ExtendBatches([TwoDocuments()], [], Stream(), 64, 16, 0.0, 2, 1, 1, 2, True).next_step()[0]
    assert masked.seq_idx[0].tolist() == [1] * 32 + [2] * 32
    assert masked.labels[0, 31] == IGNORE  # after the eos: no loss across the boundary
    plain = ExtendBatches([TwoDocuments()], [], Stream(), 64, 16, 0.0, 2, 1, 1, 2, False).next_step()[0]
    assert plain.seq_idx is None and plain.labels[0, 31] == IGNORE


def test_retrieval_documents_have_the_length_one_document_and_answer_every_question(tokenizer):
    texts = ["alpha beta gamma delta words many more words here " * 40, "other words filler text again " * 60]
    filler = Documents.from_texts("filler", texts, tokenizer).without_markers("filler")
    retrieval = Retrieval(filler, tokenizer, filler_vocabulary(texts))
    for seed in range(5):
        row = retrieval.row(np.random.default_rng(seed), 1500)
        assert len(row) == 1500 and row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
        assert tokenizer.bos_id not in row[1:-1].tolist() and tokenizer.eos_id not in row[1:-1].tolist()
        text = tokenizer.decode(row.tolist(), skip_special=True)
        facts = [line for line in text.split("\n") if any(k in line for k in ("is ", "has ", "given ", "reads", "->"))]
        assert len(facts) >= 4
        for line in text.split("\n"):
            if line.startswith(("Q: ", "Which ", "Look up ")):
                value = line.rstrip(".").split()[-1]
                assert text.index(value) < text.index(line)  # the answer stands earlier in the document


def test_loss_by_position_is_the_per_token_loss_averaged_in_buckets():
    model = random_model(vocab_size=64, scale=1.0, max_position_embeddings=256).eval()
    docs = [np.random.default_rng(i).integers(0, 64, 129) for i in range(2)]
    edges = bucket_edges(16, 128)
    assert edges == [0, 16, 32, 64, 128]
    got = loss_by_position(model, docs, 128, edges)
    with torch.no_grad():
        per_token = torch.stack([torch.nn.functional.cross_entropy(model(torch.tensor(d[:128])[None])[0],
                                                                   torch.tensor(d[1:129]), reduction="none")
                                 for d in docs]).mean(0)
    for i in range(4):
        assert got.nll[i] == pytest.approx(per_token[edges[i]:edges[i + 1]].mean().item(), abs=1e-5)
    assert got.tokens == [32, 32, 64, 128]
    assert got.past(16) == pytest.approx(per_token[16:].mean().item(), abs=1e-5)


def saved_elements(model, tokens: int, depths: int) -> float:
    """Elements of the tensors autograd saves in one training forward (parameters left out), per token."""
    objective = CausalLMObjective(model, depths)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    seen = {}

    def keep(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        objective(ids, ids.clone(), [1.0] * (depths + 1) + [1e-4])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights) / 4 / tokens


@pytest.mark.parametrize("pattern,depths", [("M", 0), ("*", 0), ("E", 0), ("-", 0), ("MEM*EMEM*E/*E", 2)])
def test_the_activation_plan_is_within_20_percent_of_what_autograd_saves(pattern, depths):
    config = dataclasses.replace(load("cpu").model, pattern=pattern, max_position_embeddings=2048)
    model = n3.build(config)
    assert activations_per_token(config, depths, recompute=False) == pytest.approx(
        saved_elements(model, 2048, depths), rel=0.2)
    model.set_activation_checkpointing(True)
    # What the forward keeps; the plan adds the largest sublayer, which the backward holds while it recomputes it.
    peak = max(saved_per_token(config, kind) for kind in config.main_pattern + config.mtp_pattern)
    assert activations_per_token(config, depths, recompute=True) - peak == pytest.approx(
        saved_elements(model, 2048, depths), rel=0.2)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = random_model(vocab_size=64, scale=1.0).train()
    ids = torch.randint(0, 64, (2, 96))
    seq_idx = torch.tensor([[0] * 40 + [1] * 56, [0] * 96])
    results = []
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        out = CausalLMObjective(model, 2)(ids, ids.clone(), [1.0, 0.1, 0.1, 1e-4], seq_idx=seq_idx)
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_corpus):
    """A tiny pretraining checkpoint with a 256-token context, in the small corpus' tokenizer."""
    tokenizer = Tokenizer.load(small_corpus)
    path = tmp_path_factory.mktemp("extend") / "base"
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=1.0, max_position_embeddings=256), path)
    tokenizer.save(path)
    return path


def settings(corpus, *extra: str) -> list[str]:
    return [arg for item in [f"data.path={corpus}", *FAST, *extra] for arg in ("--set", item)]


@pytest.fixture(scope="module")
def finished(base, small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "extend"
    process = n3_process("extend", "-c", str(base), "--out", str(run), *settings(small_corpus))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run, out


def test_run_folder_report_and_metrics(finished):
    run, out = finished
    for words in ("Loss by position", "RULER", "niah_single_1", "short-context validation loss", "wall time"):
        assert words in out, words
    records = read_metrics(run / "metrics.jsonl")
    assert [r["phase"] for r in records] == ["long", "long", "short"] and "val_loss" in records[-1]
    assert {r["lr"] for r in records} == {3e-4}  # not from a pretrain run: the cpu preset's train.min_lr
    report = json.loads((run / "extend.json").read_text())
    assert report["short_steps"] == 1 and report["before"]["positions"]["edges"] == [0, 512, 1024, 2048]
    assert set(report["after"]["ruler"]) == {"niah_single_1", "niah_multikey_1", "vt"}
    checkpoint = n3.resolve_checkpoint(run)
    assert read_config(checkpoint)["max_position_embeddings"] == 2048  # n3 serve and n3 eval take it
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert trainer["stage"] == "extend" and trainer["seq_len"] == 2048
    assert (run / "before.json").is_file() and (run / "positions.png").is_file()


def test_sigkill_then_resume_repeats_the_losses_bitwise(base, small_corpus, tmp_path):
    args = ["-c", str(base), *settings(small_corpus, "extend.train.steps=6", "extend.train.checkpoint_interval=2")]
    keys = ("step", "phase", "loss", "ce", "mtp", "grad_norm", "lr", "val_loss")
    assert_killed_and_resumed_repeats("extend", args, tmp_path, first=2, last=6, keys=keys)


def test_two_context_parallel_gloo_processes_match_one(base, small_corpus, tmp_path):
    """Both processes share every row (extend.context_parallel = 2), long and short iterations alike; how rows split
    over data-parallel ranks is the row test's above."""
    args = ["-c", str(base), *settings(small_corpus, "extend.train.steps=3", "parallel.strategy=ddp",
                                       "extend.context_parallel=2")]
    single = n3_process("extend", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    two = torchrun("extend", "--out", str(tmp_path / "two"), *args)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, both, strict=True):
        for key in ("loss", "ce", "grad_norm", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-4, (key, a, b)


def test_dry_run_plans_the_long_length_with_the_phase_layout(capsys):
    code, out, _ = cli(capsys, "extend", "--preset", "gb200", "--dry-run")
    assert code == 0
    out = " ".join(out.split())
    assert "context 32" in out and "32.77K tokens" in out and "with activation checkpointing" in out


def test_the_learning_rate_is_the_pretraining_runs_min_lr(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer.json").write_text(json.dumps({"stage": "pretrain", "preset": "cpu"}))
    (tmp_path / "run" / "cpu.toml").write_text("[train]\nmin_lr = 2.5e-6\n")
    assert starting_min_lr(checkpoint, load("cpu"), Quiet()) == 2.5e-6
    progress = Quiet()
    assert starting_min_lr(tmp_path, load("cpu"), progress) == load("cpu").train.min_lr and progress.notes


def test_bad_input_is_a_clear_error(base, finished, small_corpus, tmp_path, capsys):
    docs = tmp_path / "short-docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a few words only")
    longer = tmp_path / "longer"
    shutil.copytree(finished[0], longer)
    other = tmp_path / "other-run"
    shutil.copytree(finished[0], other)
    trainer = next(other.glob("checkpoints/*/trainer.json"))
    trainer.write_text(json.dumps(json.loads(trainer.read_text()) | {"stage": "sft"}))
    cases = [
        (["-c", str(base), *settings(small_corpus, "extend.train.seq_len=256", "extend.short_seq_len=128",
                                         "extend.ruler_lengths=256")],
         "must be above the context"),
        (["-c", str(base), *settings(small_corpus, "extend.short_seq_len=100")], "divide it"),
        (["-c", str(base), *settings(small_corpus), "--data", "retreival"], "did you mean 'retrieval'"),
        (["-c", str(base), *settings(small_corpus), "--data", f"mine={docs}"], "no document is longer"),
        (["-c", str(base), *settings(small_corpus, "extend.context_parallel=3")], "must divide model.mamba_num_heads"),
        (["-c", str(base), *settings(small_corpus, "extend.context_parallel=4", "extend.short_seq_len=2")],
         "must divide extend.train.seq_len"),
        (["--resume", "--out", str(tmp_path / "nothing")], "not a run folder"),
        (["--resume", "--out", str(other)], "it is not an extend run"),
        (["--resume", "--out", str(longer), "--seq-len", "4096"], "it extends to 2048"),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "bad")]
        code, _, err = cli(capsys, "extend", *out, *args)
        assert code == 2 and message in " ".join(err.split()), (message, err)
