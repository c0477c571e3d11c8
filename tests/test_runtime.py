"""The training runtime's parts on their own: the WSD schedule, weight-decay groups, packing, the curriculum and the
rank split, the fused linear cross-entropy, MTP labels, MoE balancing, and the monitor's warnings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import presets
from kernels import linear_cross_entropy
from kernels.cross_entropy import IGNORE
from model.hybrid import build
from stages.runtime.batches import PackedBatches, validation_batches
from stages.runtime.corpus import Manifest, read_index, read_tokens
from stages.runtime.losses import CausalLMObjective, mtp_labels, sequence_aux_loss, update_expert_bias
from stages.runtime.metrics import Monitor, max_violation
from stages.runtime.optim import build_optimizer, param_groups, wsd_lr
from tests.test_model import tiny_config


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_schedule(shape):
    train = presets.load("cpu", [f"train.decay_shape={shape}", "train.lr=1.0", "train.min_lr=0.1",
                                 "train.warmup_steps=10", "train.decay_fraction=0.2"]).train
    lrs = [wsd_lr(step, 100, train) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup to the peak
    assert lrs[10:80] == [1.0] * 70  # stable
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[79:], lrs[80:]))  # decays to min_lr
    halfway = {"linear": 0.55, "cosine": 0.55, "sqrt": 1 - 0.9 * math.sqrt(0.5)}[shape]
    assert lrs[89] == pytest.approx(halfway)


def test_weight_decay_groups():
    model = build(tiny_config())
    decay, plain = param_groups(model, 0.1, presets.load("cpu").train.no_decay)
    plain_names = {n for n, p in model.named_parameters() if any(p is q for q in plain["params"])}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(n.endswith(("norm.weight", "norm_f.weight", "bias", "A_log", ".D", "layernorm.weight", "enorm.weight",
                           "hnorm.weight")) for n in plain_names)
    assert "model.layers.0.mixer.A_log" in plain_names and "model.layers.0.mixer.conv1d.bias" in plain_names
    assert all(p.dim() >= 2 for p in decay["params"])  # every matrix decays, no vector does


def test_packing_keeps_losses_inside_documents(small_corpus):
    m = Manifest.load(small_corpus)
    batches = PackedBatches(small_corpus, m, seq_len=32, micro_batch=2, global_batch=4, total_steps=50)
    for _ in range(3):
        for mb in batches.next_step():
            x, y = mb.input_ids, mb.labels
            assert torch.all(y[x == m.eos_id] == IGNORE)  # nothing predicted across a document boundary
            keep = y != IGNORE
            assert keep.float().mean() > 0.9
            assert torch.equal(x[:, 1:][keep[:, :-1]], y[:, :-1][keep[:, :-1]])  # labels are the next inputs
    # A source's sequences tile its stream, its documents in an order the seed shuffles: sequence n starts at
    # n * seq_len of the shuffled stream.
    fresh = PackedBatches(small_corpus, m, seq_len=32, micro_batch=4, global_batch=4, total_steps=50, seed=7)
    rows = fresh.next_step()[0].input_ids.tolist()
    for source in m.sources:
        tokens, index = np.asarray(read_tokens(small_corpus, m, source.name, "train")), read_index(small_corpus,
                                                                                                   source.name, "train")
        documents, _ = fresh.orders[source.name]
        assert sorted(map(tuple, documents.tolist())) == sorted(map(tuple, index.tolist()))  # each document once
        assert not np.array_equal(documents, index)  # shuffled
        stream = np.concatenate([tokens[start : start + length] for start, length in documents])
        windows = [stream[i * 32 : (i + 1) * 32].tolist() for i in range(4)]
        mine = [r for r in rows if r in windows]
        assert mine == windows[: len(mine)] and mine
    same = PackedBatches(small_corpus, m, seq_len=32, micro_batch=4, global_batch=4, total_steps=50, seed=7)
    other = PackedBatches(small_corpus, m, seq_len=32, micro_batch=4, global_batch=4, total_steps=50, seed=8)
    assert torch.equal(same.next_step()[0].input_ids, torch.tensor(rows))
    assert not torch.equal(other.next_step()[0].input_ids, torch.tensor(rows))


def test_curriculum_and_rank_split_and_resume(small_corpus):
    m = Manifest.load(small_corpus)
    make = lambda rank=0, world=1, micro=2: PackedBatches(  # noqa: E731
        small_corpus, m, seq_len=16, micro_batch=micro, global_batch=8, total_steps=100, rank=rank, world=world)
    single = make()
    drawn = {phase.name: {s.name: 0 for s in m.sources} for phase in m.phases}
    for step in range(100):
        before = dict(single.taken)
        single.next_step()
        phase = m.phases[0 if step < 75 else 1].name
        assert single.phase() == phase
        for name in before:
            drawn[phase][name] += single.taken[name] - before[name]
    for phase in m.phases:  # the round-robin follows each phase's weights closely
        total = sum(drawn[phase.name].values())
        for name, weight in phase.weights.items():
            assert abs(drawn[phase.name][name] / total - weight) < 2 / total + 1e-9
    # Two ranks see the single process's micro-batches, interleaved: rank r holds micro-batches r, r + 2, ...
    one, ranks = make(micro=2), [make(rank=r, world=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_step()
        parts = [b.next_step() for b in ranks]
        for i, mb in enumerate(whole):
            theirs = parts[i % 2][i // 2]
            assert torch.equal(mb.input_ids, theirs.input_ids) and torch.equal(mb.labels, theirs.labels)
    # A state dict taken mid-run continues with exactly the same sequences.
    state = one.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(one.next_step(), resumed.next_step()):
        assert torch.equal(a.input_ids, b.input_ids)


def test_validation_windows_cover_every_source(small_corpus):
    m = Manifest.load(small_corpus)
    batches = validation_batches(small_corpus, m, seq_len=16, sequences=10, micro_batch=4)
    assert [len(b.input_ids) for b in batches] == [4, 4, 2]
    again = validation_batches(small_corpus, m, seq_len=16, sequences=10, micro_batch=4)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))  # the same every time


def test_linear_cross_entropy_matches_the_plain_loss():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (300,), generator=gen)
    labels[::5] = IGNORE
    row_weights = torch.rand(300, generator=gen)
    import kernels.cross_entropy as ce

    for chunk in (1 << 20, 64 * 50):  # one chunk, and several
        ce.CHUNK_ELEMENTS["cpu"], saved = chunk, ce.CHUNK_ELEMENTS["cpu"]
        try:
            total, rows = linear_cross_entropy(h, w, labels, row_weights)
            grads = torch.autograd.grad(total * 3, (h, w))
        finally:
            ce.CHUNK_ELEMENTS["cpu"] = saved
        plain = F.cross_entropy(h @ w.T, labels, reduction="none", ignore_index=IGNORE)
        torch.testing.assert_close(rows, plain.detach())
        expected = torch.autograd.grad((plain * row_weights).sum() * 3, (h, w))
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b)


def test_mtp_labels_stop_at_document_boundaries():
    labels = torch.tensor([[1, 2, IGNORE, 4, 5, 6]])
    assert mtp_labels(labels, 1).tolist() == [[2, IGNORE, IGNORE, 5, 6, IGNORE]]
    assert mtp_labels(labels, 2).tolist() == [[IGNORE, IGNORE, IGNORE, 6, IGNORE, IGNORE]]


def test_sequence_aux_loss_and_bias_update():
    E, T = 4, 8  # experts, tokens; two chosen per token
    balanced = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    assert sequence_aux_loss(torch.full((T, E), 0.5), balanced, 1).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1]] * T)
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * T, requires_grad=True)
    loss = sequence_aux_loss(scores, skewed, 1)
    assert loss.item() == pytest.approx(1.8)  # f = (2, 2, 0, 0), P = (0.45, 0.45, 0.05, 0.05)
    loss.backward()
    assert torch.all(scores.grad[:, :2] > 0)  # pushes the overloaded experts' scores down
    moe = build(tiny_config()).model.layers[2].mixer
    update_expert_bias(moe, torch.tensor([10.0, 0, 5, 5, 5, 5]), rate=0.01)
    assert moe.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0])
    assert max_violation(torch.tensor([[10.0, 0, 5, 5, 5, 5]])).item() == pytest.approx(2.0)


def test_objective_reports_every_term():
    torch.manual_seed(0)
    model = build(tiny_config())
    objective = CausalLMObjective(model, mtp_depths=2)
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE
    out = objective(ids, labels, [1.0, 0.5, 0.25, 0.1])
    plain = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE)
    assert out["head_sums"][0].item() == pytest.approx(plain.item(), rel=1e-5)
    expected = out["head_sums"] @ torch.tensor([1.0, 0.5, 0.25]) + 0.1 * out["aux"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["expert_load"].shape == (2, 6) and out["expert_load"].sum(1).tolist() == [48, 96]  # MTP: 2 depths
    assert out["residual_rms"].shape == (5,) and model.model.residual_rms is None
    out["loss"].backward()
    assert [n for n, p in objective.named_parameters() if p.grad is None] == []


def test_compiled_blocks_train_like_eager_ones(monkeypatch):
    """train.compile: every block of the main stack and the MTP head compiled (each kind of block a shipped shape
    uses); three optimizer steps give the eager losses (the MoE aux loss included, so the routing a compiled MoE
    block records is the eager one). Where torch.compile cannot build code, a note and eager training."""
    from stages.runtime import compiling

    # Earlier tests' graphs of Block.forward count against dynamo's recompile limit; past it, blocks run eagerly.
    torch._dynamo.reset()
    train = presets.load("cpu").train
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)

    def losses(compile: bool) -> list[float]:
        torch.manual_seed(0)
        objective = CausalLMObjective(build(tiny_config(pattern="M*E/*E")), mtp_depths=2)
        notes = []
        compiled = compiling.compile_blocks(objective.model, notes.append) if compile else 0
        assert compiled == (5 if compile else 0) and len(notes) == compile
        optimizer = build_optimizer(objective, train)
        result = []
        for _ in range(3):
            out = objective(ids, labels, [1 / 32, 0.1 / 32, 0.1 / 32, 1e-4])
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            result.append(out["loss"].item())
        return result

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)
    monkeypatch.setattr(compiling, "_toolchain_problem", lambda: "no C++ compiler")
    notes = []
    assert compiling.compile_blocks(build(tiny_config()), notes.append) == 0
    assert notes == ["train.compile: torch.compile does not work here (no C++ compiler); training eagerly"]


def test_compiled_blocks_train_at_a_second_length():
    """Compiled Mamba blocks trained at one length, then at another (extend's short iterations after its long ones),
    give eager's gradients. Compiled dynamic in the length, inductor's CPU backward (torch 2.13) corrupted the heap
    at these widths (a head of 16 floats: one AVX-512 vector) and glibc aborted the process at the second length."""
    from stages.runtime import compiling

    torch._dynamo.reset()
    cfg = tiny_config(pattern="MM", chunk_size=16, ssm_state_size=16, mamba_head_dim=16, mamba_groups=1,
                      mamba_num_heads=4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, t), generator=generator) for t in (16, 32)]

    def gradients(compile: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build(cfg)
        if compile:
            assert compiling.compile_blocks(model, lambda note: None) == 2
        for ids in batches:
            model.logits(model.model(ids)).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.model.parameters()]

    for compiled, eager in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_monitor_warns_on_maxvio_and_residual_jumps():
    monitor = Monitor(maxvio_limit=5.0, residual_jump=2.0)
    assert monitor.check(1, [1.2, 1.3], [1.0, 2.0], ["2", "mtp.1"]) == []
    assert monitor.check(2, [1.2, 7.5], [1.1, 2.1], ["2", "mtp.1"]) == [
        "step 2: MaxVio 7.50 in MoE layer mtp.1 (limit 5): routing is collapsing"]
    warnings = monitor.check(3, [1.2, 1.3], [5.0, 2.2], ["2", "mtp.1"])
    assert len(warnings) == 1 and "residual RMS of layer 0 jumped to 5" in warnings[0]
    settling = Monitor(maxvio_limit=5.0, residual_jump=2.0, settle_steps=2)
    assert settling.check(1, [1.0], [1.0], ["2"]) == [] and settling.check(2, [1.0], [5.0], ["2"]) == []
    assert len(settling.check(3, [1.0], [20.0], ["2"])) == 1  # after settling, a jump warns
    restored = Monitor(5.0, 2.0)
    restored.load_state_dict(monitor.state_dict())
    assert restored.check(4, [1.0, 1.0], [1.0, 2.0], ["2", "mtp.1"]) == monitor.check(4, [1.0, 1.0], [1.0, 2.0],
                                                                                      ["2", "mtp.1"])
