"""Packed rows with document boundaries (`seq_idx`): every document runs as if alone, in the kernels (SSD scan, causal
conv, attention), the model (logits, MTP hidden states) and the objective (MTP labels, losses)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import model as n3
from kernels import attention, causal_conv1d, ssd_chunk_scan
from kernels.backends import importable
from kernels.cross_entropy import IGNORE
from kernels.documents import cu_seqlens_from_seq_idx, seq_idx_from_cu_seqlens, seq_idx_from_lengths
from model.cache import HybridCache
from stages.runtime.compiling import compile_blocks
from stages.runtime.losses import CausalLMObjective, head_token_counts, mtp_labels
from tests.test_kernels import ssd_inputs
from tests.test_model import tiny_config

ROWS = [[1, 3, 6, 2, 9, 3], [5, 1, 8, 9, 1]]
"""Two rows of 24 tokens: documents of length 1 and longer than a chunk (4 in tiny_config); with chunks of 4,
documents start inside chunks (at 1, 10, 21; 5, 6, 14, 23) and at chunk starts (4, 12)."""
T = 24


def documents(seq_idx_row: torch.Tensor) -> list[slice]:
    """The positions of each document of one row."""
    bounds = [0, *torch.cumsum(seq_idx_row.bincount(), 0).tolist()]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def test_seq_idx_helpers():
    assert seq_idx_from_cu_seqlens([0, 5, 7, 11]).tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]]
    seq_idx = seq_idx_from_lengths([[2, 1, 3], [4]], 6)  # the second row's last 2 tokens (padding): a document
    assert seq_idx.tolist() == [[0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1]]
    cu_seqlens, longest = cu_seqlens_from_seq_idx(seq_idx)
    assert cu_seqlens.tolist() == [0, 2, 3, 6, 10, 12] and cu_seqlens.dtype == torch.int32 and longest == 4
    with pytest.raises(ValueError, match="sum to at most 6"):
        seq_idx_from_lengths([[4, 3]], 6)


# Kernels: a packed row equals its documents run one by one.


@pytest.mark.parametrize("chunk", [4, 5, 8])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_scan_restarts_at_every_document(chunk, with_state):
    """Outputs, the final state (the last document's) and the gradients of every input, the initial state (the first
    document's) included, against each document scanned alone."""
    seq_idx = seq_idx_from_lengths(ROWS, T)
    inputs = [v.requires_grad_() for v in ssd_inputs(t=T)]
    x, dt, A, B, C, D, state = inputs
    init = state if with_state else None
    gen = torch.Generator().manual_seed(7)
    y_weight = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    state_weight = torch.randn(state.shape, generator=gen, dtype=x.dtype)

    y, final = ssd_chunk_scan(x, dt, A, B, C, D, chunk, init, seq_idx=seq_idx)
    alone_y, alone_final = [], []
    for row in range(2):
        parts = []
        for d, span in enumerate(documents(seq_idx[row])):
            x_d, dt_d, B_d, C_d = (v[row : row + 1, span] for v in (x, dt, B, C))
            start = None if init is None or d else init[row : row + 1]
            y_d, final_d = ssd_chunk_scan(x_d, dt_d, A, B_d, C_d, D, chunk, start)
            parts.append(y_d)
        alone_y.append(torch.cat(parts, 1))
        alone_final.append(final_d)
    alone_y, alone_final = torch.cat(alone_y), torch.cat(alone_final)
    torch.testing.assert_close(y, alone_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, alone_final, rtol=1e-10, atol=1e-10)

    leaves = inputs if with_state else inputs[:-1]
    got = torch.autograd.grad((y * y_weight).sum() + (final * state_weight).sum(), leaves)
    want = torch.autograd.grad((alone_y * y_weight).sum() + (alone_final * state_weight).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_restarts_at_every_document(with_state):
    """No tap reads an earlier document; the returned state is the last document's alone (zero-padded where it is
    shorter than the kernel: the second row ends in a document of one token)."""
    gen = torch.Generator().manual_seed(1)
    seq_idx = seq_idx_from_lengths(ROWS, T)
    x = torch.randn(2, T, 5, generator=gen)
    w, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    init = torch.randn(2, 5, 3, generator=gen) if with_state else None
    y, state = causal_conv1d(x, w, bias, init, seq_idx=seq_idx)
    for row in range(2):
        for d, span in enumerate(documents(seq_idx[row])):
            start = None if init is None or d else init[row : row + 1]
            y_d, state_d = causal_conv1d(x[row : row + 1, span], w, bias, start)
            torch.testing.assert_close(y[row : row + 1, span], y_d)
        torch.testing.assert_close(state[row : row + 1], state_d)


def test_attention_sees_only_its_document():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, T, 8, generator=gen) for h in (4, 2, 2))
    seq_idx = seq_idx_from_lengths(ROWS, T)
    out = attention(q, k, v, seq_idx=seq_idx)
    for row in range(2):
        for span in documents(seq_idx[row]):
            alone = attention(*(z[row : row + 1, :, span] for z in (q, k, v)))
            torch.testing.assert_close(out[row : row + 1, :, span], alone)


def test_attention_one_document_at_a_time_equals_the_block_diagonal_mask():
    """Eager packed rows run causal SDPA per document; compiled code takes the mask. Both give the same outputs and
    gradients, documents of one token included."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 40, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    seq_idx = seq_idx_from_lengths([[13, 1, 26], [40]], 40)
    mask = torch.ones(40, 40, dtype=torch.bool).tril() & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = attention(q, k, v, seq_idx=seq_idx)
    torch.testing.assert_close(out, reference)
    weights = torch.randn(out.shape, generator=gen)
    for mine, theirs in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                            torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(mine, theirs)


# The model: logits and MTP hidden states.


def packed_model() -> n3.NemotronH:
    """The tiny model of every block kind with its MTP block (chunks of 4), fp32. Weights 10x the usual scale, so
    every sublayer's output shows in the last bits of the residual stream (at 0.02 the experts' does not)."""
    torch.manual_seed(0)
    return n3.build(tiny_config(initializer_range=0.2))


def kept(seq_idx: torch.Tensor, depth: int) -> torch.Tensor:
    """Positions whose depth-`depth` MTP label can be kept: the target lies in the same document."""
    return mtp_labels(torch.zeros_like(seq_idx), depth, seq_idx) != IGNORE


@torch.no_grad()
def test_packed_rows_equal_their_documents_run_alone():
    """Logits and MTP hidden states (where their labels are kept) of two packed rows with different boundaries
    against each document run alone."""
    model = packed_model()
    seq_idx = seq_idx_from_lengths(ROWS, T)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(3))
    h = model.model(ids, seq_idx=seq_idx)
    logits, depths = model.logits(h), model.mtp_hidden(h, ids, 2, seq_idx)
    for row in range(2):
        for span in documents(seq_idx[row]):
            doc = ids[row : row + 1, span]
            h_doc = model.model(doc)
            torch.testing.assert_close(logits[row : row + 1, span], model.logits(h_doc), rtol=1e-5, atol=1e-5)
            for k, (packed, alone) in enumerate(zip(depths, model.mtp_hidden(h_doc, doc, 2)), start=1):
                keep = kept(seq_idx, k)[row, span]
                torch.testing.assert_close(packed[row, span][keep], alone[0][keep], rtol=1e-5, atol=1e-5)


def two_versions(model: n3.NemotronH) -> tuple[torch.Tensor, list, list]:
    """One row [B1 | A | B2 | B3] run twice with different tokens in A: whether each position lies outside A, and the
    (logits, MTP hidden states) of both runs. A starts inside a chunk and ends at a chunk start; B2 starts in that
    chunk."""
    seq_idx = seq_idx_from_lengths([[6, 7, 3, 8]], T)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (1, T), generator=gen)
    changed = ids.clone()
    changed[0, 6:13] = torch.randint(0, 64, (7,), generator=gen)
    runs = []
    for tokens in (ids, changed):
        h = model.model(tokens, seq_idx=seq_idx)
        runs.append([model.logits(h), *model.mtp_hidden(h, tokens, 2, seq_idx)])
    outside = seq_idx[0] != 1
    return outside, [outside & kept(seq_idx, k)[0] for k in (1, 2)], runs


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_document_leaves_the_others_bitwise_unchanged(compiled):
    """Changing one document's tokens changes nothing, bit for bit, in the logits of the documents before and after
    it, nor in their MTP hidden states where a label is kept: eager, and with every block compiled as training
    compiles them (gradients on). The routed experts run as training runs them, grouped by expert, so this also
    holds the expert GEMM to batch invariance (kernels.moe.ROW_TILE): which expert the other document's tokens
    choose must not change how this one's rows round."""
    model = packed_model()
    if compiled and compile_blocks(model, lambda note: None) == 0:
        pytest.skip("torch.compile does not work here")
    outside, keep, (first, second) = two_versions(model)
    assert not torch.equal(first[0][0, ~outside], second[0][0, ~outside])  # A itself did change
    assert torch.equal(first[0][0, outside], second[0][0, outside])
    for k in (1, 2):
        assert keep[k - 1].any() and torch.equal(first[k][0, keep[k - 1]], second[k][0, keep[k - 1]])


# The objective.


def test_mtp_labels_stop_at_documents_not_at_loss_masks():
    """SFT rows: a prompt's ignored labels do not stop an MTP depth from predicting the assistant tokens after them;
    a document boundary does."""
    I = IGNORE
    # Document 0: two prompt positions, three assistant labels, its last position ignored; document 1: two labels.
    labels = torch.tensor([[I, I, 12, 13, 14, I, 20, 21, I]])
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    assert mtp_labels(labels, 0, seq_idx).tolist() == labels.tolist()
    assert mtp_labels(labels, 1, seq_idx).tolist() == [[I, 12, 13, 14, I, I, 21, I, I]]
    assert mtp_labels(labels, 2, seq_idx).tolist() == [[12, 13, 14, I, I, I, I, I, I]]
    assert head_token_counts(labels, 2, seq_idx).tolist() == [5, 4, 3]
    # Without seq_idx an ignored label is a boundary: the prompt position 1 predicts nothing.
    assert mtp_labels(labels, 1).tolist() == [[I, I, 13, 14, I, I, 21, I, I]]


def sft_labels(ids: torch.Tensor, seq_idx: torch.Tensor, prompts: list[int]) -> torch.Tensor:
    """Next-token labels inside each document, ignored at its last position and at the `prompts` positions."""
    labels = torch.where(torch.roll(seq_idx, -1, 1) == seq_idx, torch.roll(ids, -1, 1), IGNORE)
    labels[:, -1] = IGNORE
    labels[:, prompts] = IGNORE
    return labels


def test_packed_loss_is_the_token_weighted_loss_of_its_documents():
    """The objective on a packed row: each head's summed loss (main, MTP depths) is the sum of its documents' run
    alone, so the loss is the token-weighted mean of theirs; no MTP label crosses a boundary."""
    objective = CausalLMObjective(packed_model(), mtp_depths=2)
    seq_idx = seq_idx_from_lengths(ROWS[:1], T)
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(5))
    labels = sft_labels(ids, seq_idx, prompts=[4, 5, 12, 13, 14])  # prompts open the third and fifth documents
    counts = head_token_counts(labels, 2, seq_idx)
    weights = [*(1 / counts).tolist(), 0.0]  # means per head, no aux loss
    packed = objective(ids, labels, weights, seq_idx)
    sums = torch.zeros(3)
    for span in documents(seq_idx[0]):
        alone = objective(ids[:, span], labels[:, span], weights, torch.zeros_like(ids[:, span]))
        sums += alone["head_sums"]
    torch.testing.assert_close(packed["head_sums"], sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["loss"], (sums / counts).sum(), rtol=1e-5, atol=1e-5)


def test_seq_idx_with_a_cache_is_refused():
    model = packed_model()
    ids = torch.randint(0, 64, (1, 6))
    with pytest.raises(ValueError, match="seq_idx"):
        model(ids, HybridCache(model.config, rows=1, max_len=8), seq_idx=torch.zeros_like(ids))


@pytest.mark.gpu
def test_fast_paths_with_documents_match_the_reference():
    """mamba_ssm's chunk scan, causal_conv1d and flash-attn's varlen attention with seq_idx against the references,
    in bf16."""
    from kernels import backends
    from kernels.ssd import ssd_chunk_scan_reference

    if not (importable("mamba_ssm.ops.triton.ssd_combined") and importable("causal_conv1d")):
        pytest.skip("needs mamba_ssm and causal_conv1d")
    gen = torch.Generator(device="cuda").manual_seed(6)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")
    t, h, p, g, n, ch = 200, 8, 16, 2, 16, 64
    seq_idx = seq_idx_from_lengths([[1, 63, 64, 50, 22], [130, 70]], t).cuda()
    x, B, C = rand(2, t, h, p).bfloat16(), rand(2, t, g, n).bfloat16(), rand(2, t, g, n).bfloat16()
    dt = torch.nn.functional.softplus(rand(2, t, h) - 2)
    A, D = -torch.rand(h, generator=gen, device="cuda") - 0.5, rand(h)
    y, final = ssd_chunk_scan(x, dt, A, B, C, D, 64, seq_idx=seq_idx)
    want_y, want_final = ssd_chunk_scan_reference(x, dt, A, B, C, D, 64, seq_idx=seq_idx)
    torch.testing.assert_close(y, want_y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(final, want_final, rtol=2e-2, atol=2e-2)

    xc, w, bias = rand(2, t, ch).bfloat16(), rand(ch, 4).bfloat16(), rand(ch).bfloat16()
    fast = causal_conv1d(xc, w, bias, seq_idx=seq_idx)
    chosen = backends.chosen()
    try:
        backends.configure(conv1d="torch", attention="torch")
        reference = causal_conv1d(xc, w, bias, seq_idx=seq_idx)
        q, k, v = (rand(2, heads, t, 64).bfloat16() for heads in (8, 2, 2))
        want_attention = attention(q, k, v, seq_idx=seq_idx)
    finally:
        backends.configure(conv1d=chosen["conv1d"], attention=chosen["attention"])
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    if importable("flash_attn"):
        torch.testing.assert_close(attention(q, k, v, seq_idx=seq_idx).float(), want_attention.float(),
                                   rtol=2e-2, atol=2e-2)
