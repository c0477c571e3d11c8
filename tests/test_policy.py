"""The learner side of RL: log-probs of sampled tokens under the sampler's distribution, the GRPO-family losses,
rollouts packed into isolated rows, and a data-parallel step that equals one process's."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import presets
from kernels.cross_entropy import IGNORE
from kernels import cross_entropy, logprobs
from kernels.logprobs import linear_logprobs
from model.engine.sampling import filtered_probs
from model.hybrid import build
from stages.rollout.batches import PolicyMicroBatch, Trajectory, pack_trajectories
from stages.rollout.learner import PolicyLossSettings, PolicyObjective, Sampling, accumulate_policy_gradients
from stages.rollout.losses import clipped_policy_loss, group_advantages, k3, overlong_penalty, token_weights
from stages.runtime import distributed
from stages.runtime.distributed import World
from tests.conftest import free_port
from tests.test_model import tiny_config


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.5)])
def test_linear_logprobs_are_those_of_the_sampling_distribution(temperature, top_k, top_p, keep, monkeypatch):
    """Values, entropies and gradients (under per-token loss weights, over chunks of rows) against the materialised
    distribution, with the forward's probabilities kept for the backward and recomputed in it."""
    monkeypatch.setitem(cross_entropy.CHUNK_ELEMENTS, "cpu", 40 * 64)  # chunks of 64 rows
    monkeypatch.setitem(logprobs.KEEP_BYTES, "cpu", (1 << 30) if keep else 0)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(40, 16, generator=gen).requires_grad_()
    logits = (hidden @ weight.T).detach()
    probs = filtered_probs(logits, torch.full((300,), temperature), torch.full((300,), top_k),
                           torch.full((300,), top_p))
    tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # drawn from what the engine samples from
    logp, entropy = linear_logprobs(hidden, weight, tokens, temperature, top_k, top_p)
    expected = probs.gather(1, tokens[:, None]).squeeze(1).log()
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    torch.testing.assert_close(entropy, -plogp.sum(-1), atol=1e-5, rtol=1e-5)

    # The gradient is that of the materialised log-softmax over the kept tokens.
    loss_weights = torch.randn(300, generator=gen)
    (logp * loss_weights).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = (hidden @ weight.T) / temperature
    full = full.masked_fill(probs == 0, float("-inf")).log_softmax(-1)
    (full.gather(1, tokens[:, None]).squeeze(1) * loss_weights).sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_a_token_outside_the_kept_set_gets_no_gradient(keep, monkeypatch):
    """-inf log-prob (a token top-k could not have drawn) and a zero gradient, not NaN, through both backward paths."""
    monkeypatch.setitem(logprobs.KEEP_BYTES, "cpu", (1 << 30) if keep else 0)
    hidden = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    weight = torch.randn(10, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
    tokens = (hidden @ weight.T).argmin(-1).detach()  # the least likely: outside the top 2
    logp, _ = linear_logprobs(hidden, weight, tokens, 1.0, 2, 1.0)
    assert torch.isinf(logp).all()
    logp.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_an_empty_selection_still_reaches_the_weights():
    """A rank with no trained token backpropagates zeros, so its data-parallel reduction matches the others'."""
    hidden, weight = torch.randn(3, 8).requires_grad_(), torch.randn(10, 8).requires_grad_()
    logp, entropy = linear_logprobs(hidden[:0], weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,) and logp.requires_grad and not entropy.requires_grad
    logp.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    grpo = group_advantages(r, "grpo")
    torch.testing.assert_close(grpo, (r - 0.6) / (r.std(unbiased=False) + 1e-6))
    torch.testing.assert_close(group_advantages(r, "dr_grpo"), r - 0.6)
    loo = group_advantages(r, "loo")
    others = torch.stack([torch.cat([r[:i], r[i + 1 :]]).mean() for i in range(5)])
    torch.testing.assert_close(loo, r - others)
    assert group_advantages(torch.ones(4), "grpo").abs().max() == 0
    with pytest.raises(ValueError, match="advantage must be one of"):
        group_advantages(r, "ppo")


def test_token_weights_and_overlong_penalty():
    torch.testing.assert_close(token_weights([2, 3], "token", 10, 4), torch.full((5,), 0.1))
    torch.testing.assert_close(token_weights([2, 3], "sequence", 10, 4),
                               torch.tensor([1 / 8, 1 / 8, 1 / 12, 1 / 12, 1 / 12]))
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(99, 100, 0) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)


def test_clipped_loss_gradients_and_statistics():
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    # ratios 1, e^0.5 (above 1 + clip_high), e^-0.5 (below 1 - clip_low), 1
    old = torch.tensor([-1.0, -1.5, -0.5, -1.0])
    advantages = torch.tensor([2.0, 1.0, -1.0, -1.0])
    weights = torch.full((4,), 0.25)
    loss, sums = clipped_policy_loss(logp, old, advantages, weights, 0.2, 0.28)
    loss.backward()
    # Clipped tokens (ratio past the clip in the direction of their advantage) give no gradient; the others give
    # -w A r.
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, 0.0, 0.0, 0.25]))
    assert sums["clip_high"] == 1 and sums["clip_low"] == 1 and sums["tokens"] == 4

    # TIS scales each token by min(pi_old / pi_engine, cap); the mismatch statistics are 1 and 0 when they agree.
    logp = torch.zeros(3, requires_grad=True)
    behaviour = torch.tensor([0.0, -1.0, -5.0])
    loss, sums = clipped_policy_loss(logp, logp.detach(), torch.ones(3), torch.ones(3), behaviour_logp=behaviour,
                                     tis_cap=2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([1.0, 2.0, 2.0]))
    _, agree = clipped_policy_loss(logp, logp.detach(), torch.ones(3), torch.ones(3), behaviour_logp=logp.detach())
    assert agree["token_mult_prob_error"] == 3 and agree["mismatch_kl"] == 0
    assert (k3(torch.linspace(-3, 3, 13)) >= 0).all()


def trajectories(vocab: int) -> list[Trajectory]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, (prompt, reply) in enumerate([(5, 7), (3, 4), (9, 2), (4, 11), (6, 6)]):
        ids = torch.randint(0, vocab, (prompt + reply,), generator=gen).tolist()
        forced = [j == reply - 2 for j in range(reply)]  # one forced token each
        out.append(Trajectory(ids[:prompt], ids[prompt:], [-1.0] * reply, [not f for f in forced],
                              advantage=float(i % 3) - 1, env="math", group=i // 2))
    return out


def test_packed_rollouts_give_each_reply_its_own_logprobs():
    torch.manual_seed(0)
    model = build(tiny_config(initializer_range=0.2))
    policy = PolicyObjective(model).train()
    items = trajectories(64)
    weights = [torch.full((t.trained_tokens,), 1.0) for t in items]
    batches = pack_trajectories(items, weights, 24, 2, pad_id=0)
    assert sum(len(b.input_ids) for b in batches) < len(items)  # rows hold several replies
    packed = torch.cat([policy(b.input_ids, b.targets, b.seq_idx, Sampling())["logp"] for b in batches])
    alone = {}  # by prompt: each reply run by itself
    for t in items:
        ids = torch.tensor([t.prompt_ids + t.token_ids])
        targets = torch.full_like(ids, IGNORE)
        positions = torch.arange(len(t.prompt_ids) - 1, len(t) - 1)[torch.tensor(t.trained)]
        targets[0, positions] = torch.tensor(t.token_ids)[torch.tensor(t.trained)]
        alone[tuple(t.prompt_ids)] = policy(ids, targets, torch.zeros_like(ids), Sampling())["logp"]
    order = []  # the replies in the order the packer placed them: row-major over the rows' documents
    for b in batches:
        for r in range(len(b.input_ids)):
            for doc in b.seq_idx[r].unique().tolist():
                span = (b.seq_idx[r] == doc).nonzero().squeeze(1)
                if (b.targets[r, span] != IGNORE).any():
                    ids = b.input_ids[r, span].tolist()
                    order.append(next(v for k, v in alone.items() if ids[: len(k)] == list(k)))
    torch.testing.assert_close(packed, torch.cat(order), atol=1e-5, rtol=1e-5)
    assert sum(int((b.targets != IGNORE).sum()) for b in batches) == sum(t.trained_tokens for t in items)


def test_kl_to_the_reference_stays_finite_under_truncated_sampling():
    """With top-p sampling the policy samples tokens outside the reference's nucleus; the KL takes the reference's
    whole distribution, so it stays finite (the reference's truncated log-prob of such a token is -inf)."""
    torch.manual_seed(0)
    policy = PolicyObjective(build(tiny_config(initializer_range=0.2))).train()
    torch.manual_seed(1)
    reference = PolicyObjective(build(tiny_config(initializer_range=0.2))).requires_grad_(False)
    sampling = Sampling(1.0, top_p=0.3)
    items = []
    for i, prompt in enumerate(torch.randint(0, 64, (4, 5)).tolist()):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):  # the policy's greedy reply: inside its own nucleus at any top-p
                ids.append(int(policy.model(torch.tensor([ids]))[0, -1].argmax()))
        items.append(Trajectory(prompt, ids[5:], [0.0] * 6, [True] * 6, advantage=float(i % 2) - 0.5, env="math",
                                group=i // 2))
    weights = [torch.full((6,), 1 / 24) for _ in items]
    batches = pack_trajectories(items, weights, 24, 2, pad_id=0)
    truncated = torch.cat([reference(b.input_ids, b.targets, b.seq_idx, sampling)["logp"] for b in batches])
    assert torch.isinf(truncated).any()  # the case that matters: some of the policy's tokens lie outside
    stats, _ = accumulate_policy_gradients(policy, batches, sampling, PolicyLossSettings(kl_coeff=0.1), "fp32",
                                           World(0, 1, 0, torch.device("cpu")), reference)
    assert 0 < stats["kl"] < float("inf") and abs(stats["loss"]) < float("inf")
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def step_gradients(objective, batches, world) -> dict[str, torch.Tensor]:
    accumulate_policy_gradients(objective, batches, Sampling(0.9), PolicyLossSettings(tis_cap=3.0), "fp32", world)
    return {name: p.grad.clone() for name, p in distributed.unwrap(objective).named_parameters()
            if p.grad is not None}


def rank_batches(rank: int | None) -> list[PolicyMicroBatch]:
    """The step's replies (all of them, or rank's half), weighted by the global batch's trained tokens."""
    items = trajectories(64)
    total = sum(t.trained_tokens for t in items)
    mine = items if rank is None else items[rank::2]
    weights = [token_weights([t.trained_tokens], "token", total, len(items)) for t in mine]
    return pack_trajectories(mine, weights, 24, 1, pad_id=0)


def ddp_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = presets.load("cpu", ["parallel.strategy=ddp"])
    world = distributed.setup(cfg)
    try:
        torch.manual_seed(0)
        wrapped = distributed.prepare_model(PolicyObjective(build(tiny_config(initializer_range=0.2))), cfg, world)
        batches = rank_batches(rank)
        most = int(world.max(len(batches)))
        batches += [PolicyMicroBatch.empty(24, 0) for _ in range(most - len(batches))]
        grads = step_gradients(wrapped, batches, world)
        if rank == 0:
            results.put({name: g.numpy() for name, g in grads.items()})
        world.barrier()
        # DDP's reducer must go before the group: freed after the teardown, at the function's end, its group's
        # destructor joins a gloo thread that waits for the interpreter lock the destructor holds (a hang at exit).
        del wrapped
    finally:
        distributed.teardown()


def test_two_process_step_equals_one_process():
    torch.manual_seed(0)
    local = PolicyObjective(build(tiny_config(initializer_range=0.2)))
    exact = step_gradients(local, rank_batches(None), World(0, 1, 0, torch.device("cpu")))
    results = mp.get_context("spawn").SimpleQueue()
    # Read before joining: the gradients outgrow the pipe's buffer, and a writer blocks until they are read.
    workers = mp.start_processes(ddp_worker, args=(free_port(), results), nprocs=2, start_method="spawn", join=False)
    reduced = results.get()
    while not workers.join():
        pass
    assert set(reduced) == set(exact)
    for name, grad in exact.items():
        torch.testing.assert_close(torch.from_numpy(reduced[name]), grad, atol=1e-4, rtol=1e-4)
