"""Kernel references against naive definitions: the chunked SSD scan and its step against the sequential recurrence
in float64, conv1d sequence vs steps, masked attention vs plain causal, grouped matmul vs per-row products."""

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    attention, causal_conv1d, causal_conv1d_step, group_by_expert, grouped_mm, permute_rows, ssd_chunk_scan, ssd_step,
)


def naive_ssd(x, dt, A, B, C, D, state):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t + D x_t, one token at a time."""
    b, t, h, p = x.shape
    r = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(r, dim=2), C.repeat_interleave(r, dim=2)
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * A)[..., None, None]
        state = decay * state + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]) + D[:, None] * x[:, i])
    return torch.stack(ys, 1), state


def ssd_inputs(b=2, t=37, h=6, p=4, g=3, n=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    x, B, C = rand(b, t, h, p), rand(b, t, g, n), rand(b, t, g, n)
    dt = F.softplus(rand(b, t, h))
    A = -torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.1
    D = rand(h)
    state = rand(b, h, p, n)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("t,chunk", [(37, 8), (32, 8), (5, 16), (1, 4), (64, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_scan_matches_sequential_recurrence(t, chunk, with_state):
    x, dt, A, B, C, D, state = ssd_inputs(t=t)
    init = state if with_state else torch.zeros_like(state)
    want_y, want_state = naive_ssd(x, dt, A, B, C, D, init)
    y, final = ssd_chunk_scan(x, dt, A, B, C, D, chunk, state if with_state else None)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_state, rtol=1e-10, atol=1e-10)


def test_chunk_scan_gradients_match_recurrence():
    """The hand-written backward of the in-chunk decay, through the whole scan, against autograd of the recurrence."""
    inputs = [v.requires_grad_() for v in ssd_inputs(t=21)]
    x, dt, A, B, C, D, state = inputs
    gen = torch.Generator().manual_seed(9)
    want_y, want_state = naive_ssd(x, dt, A, B, C, D, state)
    y, final = ssd_chunk_scan(x, dt, A, B, C, D, 8, state)
    weights = torch.randn(y.shape, generator=gen, dtype=y.dtype), torch.randn(final.shape, generator=gen, dtype=y.dtype)
    want = torch.autograd.grad((want_y * weights[0]).sum() + (want_state * weights[1]).sum(), inputs)
    got = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_chunk_scan_splits_compose():
    """Scanning [0, s) then [s, t) from the carried state equals one scan of [0, t)."""
    x, dt, A, B, C, D, _ = ssd_inputs(t=29)
    y, final = ssd_chunk_scan(x, dt, A, B, C, D, 8)
    y1, s1 = ssd_chunk_scan(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], D, 8)
    y2, s2 = ssd_chunk_scan(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], D, 8, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, final, rtol=1e-10, atol=1e-10)


def test_step_matches_recurrence():
    x, dt, A, B, C, D, state = ssd_inputs(t=6)
    want_y, want_state = naive_ssd(x, dt, A, B, C, D, state)
    s = state
    for i in range(6):
        y, s = ssd_step(s, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
    torch.testing.assert_close(y, want_y[:, -1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, want_state, rtol=1e-10, atol=1e-10)


def test_chunk_scan_fp32_inputs_long_decay():
    """fp32 inputs with strong decay over a long chunk stay accurate (segment sums are summed, not differenced)."""
    x, dt, A, B, C, D, _ = ssd_inputs(t=200, dtype=torch.float64)
    A = A * 20
    want, _ = naive_ssd(x, dt, A, B, C, D, torch.zeros(2, 6, 4, 5, dtype=torch.float64))
    y, _ = ssd_chunk_scan(*(v.float() for v in (x, dt, A, B, C, D)), chunk_size=128)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_conv_sequence_equals_steps_and_carries_state():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 5, generator=gen)
    w, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    y, state = causal_conv1d(x, w, bias)
    # Definition: y_t = silu(bias + sum_j w[:, j] x_{t-3+j}), zeros before the start.
    padded = F.pad(x, (0, 0, 3, 0))
    want = F.silu(bias + sum(w[:, j] * padded[:, j : j + 9] for j in range(4)))
    torch.testing.assert_close(y, want)
    s = torch.zeros(2, 5, 3)
    steps = []
    for i in range(9):
        out, s = causal_conv1d_step(x[:, i], s, w, bias)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), y)
    torch.testing.assert_close(s, state)
    y1, s1 = causal_conv1d(x[:, :4], w, bias)
    y2, _ = causal_conv1d(x[:, 4:], w, bias, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def test_attention_positions_equal_causal():
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen)
    full = attention(q, k, v)
    positions = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(attention(q, k, v, positions), full)
    # The last 3 queries against the whole prefix, as a decode with a cache sees them.
    torch.testing.assert_close(attention(q[:, :, 4:], k, v, positions[:, 4:]), full[:, :, 4:])
    # Explicit GQA definition: head i reads kv head i // 2.
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(full, scores.softmax(-1) @ vv)


def test_grouped_mm_matches_rowwise():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (11, 2), generator=gen)
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # leave expert 3 with fewer (maybe no) rows
    order, inverse, counts = group_by_expert(ids, 5)
    flat = ids.reshape(-1)
    assert counts.tolist() == [int((flat == e).sum()) for e in range(5)]
    assert torch.all(flat[order][1:] >= flat[order][:-1])
    assert torch.equal(order[inverse], torch.arange(len(order)))
    x = torch.randn(len(order), 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 3, 6, generator=gen, requires_grad=True)
    out = grouped_mm(x, w, counts)
    want = torch.stack([x[i] @ w[flat[order][i]].T for i in range(len(order))])
    torch.testing.assert_close(out, want)
    # Gradients (n3's backward of the grouped GEMM, rows moved by a permutation) equal those of row-wise products.
    g = torch.randn_like(out, generator=gen)
    got = torch.autograd.grad((grouped_mm(permute_rows(x, order, inverse), w, counts) * g).sum(), (x, w))
    rowwise = torch.stack([x[order[i]] @ w[flat[order][i]].T for i in range(len(order))])
    expected = torch.autograd.grad((rowwise * g).sum(), (x, w))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_moe_dispatch_compiles_into_one_graph():
    """Grouping by expert and the grouped GEMM trace with static shapes (no graph break), so train.compile takes in
    whole LatentMoE blocks; the compiled forward and backward match eager."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, 6, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 6, generator=gen, requires_grad=True)

    def dispatch(x, w, ids):
        order, inverse, counts = group_by_expert(ids, 4)
        return permute_rows(grouped_mm(permute_rows(x, order, inverse), w, counts), inverse, order)

    compiled = torch.compile(dispatch, fullgraph=True)
    for seed in range(2):  # new counts every call, as every training step brings
        ids = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(seed))
        got = compiled(x, w, ids)
        torch.testing.assert_close(got, dispatch(x, w, ids))
        grads = torch.autograd.grad(got.square().sum(), (x, w))
        for a, b in zip(grads, torch.autograd.grad(dispatch(x, w, ids).square().sum(), (x, w))):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_is_unbiased_and_brackets(dtype):
    from kernels import stochastic_round

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4096, generator=gen) * 3
    draws = torch.stack([stochastic_round(x, dtype, gen) for _ in range(400)])
    # Every draw is a neighbour of x: the next representable value from it toward x lies at or beyond x.
    toward_x = torch.where(draws.float() < x, float("inf"), float("-inf")).to(dtype)
    beyond = torch.nextafter(draws, toward_x).float()
    assert torch.all((beyond - x) * (draws.float() - x) <= 0)
    spacing = (torch.nextafter(x.to(dtype), torch.full_like(x, float("inf")).to(dtype)).float() - x.to(dtype).float())
    mean = draws.float().mean(0)
    assert ((mean - x) / spacing).mean().abs() < 0.01  # unbiased, in units of the local spacing
    assert (mean - x).abs().mean() < (x.to(dtype).float() - x).abs().mean()  # averaging beats round-to-nearest
    exact = torch.tensor([1.0, -2.5, 0.0])
    assert torch.equal(stochastic_round(exact, dtype).float(), exact)
    big = stochastic_round(torch.tensor([float("inf"), -1e39, float("nan")]), dtype)
    assert big[0] == torch.finfo(dtype).max and big[1] == -torch.finfo(dtype).max and big[2].isnan()
