"""Mamba-2 state-space duality (SSD): the chunked scan for training and prefill, the one-step recurrence for decode,
and a short span of steps at once for speculative verification.

Recurrence per head h with state S (P, N):  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D x_t.
Heads are split into G contiguous groups; head h reads B and C of group h // (H / G).
All math runs in fp32, or float64 when given float64; outputs come in that dtype.

Packed rows (`seq_idx`, see kernels.documents) restart the state at every document start, inside a chunk too: the
decays between positions of different documents are zero, a chunk's state counts only its last document, and the
state passed on is dropped where the document changes. Each document then scans as if it ran alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan over a whole sequence of any length.

    x (b, t, h, p); dt (b, t, h), already softplus'd and clamped; A (h,), negative; B, C (b, t, g, n); D (h,) or None;
    initial_state (b, h, p, n) or None; seq_idx (b, t) document index per token or None (one document per row); the
    initial state belongs to a row's first document. Returns y (b, t, h, p) and the state after the last position
    (b, h, p, n), both fp32.
    """
    if fast_path("ssd", x.is_cuda) == "mamba_ssm":
        return _mamba_ssm_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx)
    with torch.autocast(x.device.type, enabled=False):  # the reference promises fp32 math; autocast would use bf16
        return ssd_chunk_scan_reference(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx)


def ssd_chunk_scan_reference(x, dt, A, B, C, D, chunk_size, initial_state=None, seq_idx=None):
    """The PyTorch reference of `ssd_chunk_scan` (same arguments and results)."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    L = min(chunk_size, t)  # one chunk when the sequence is shorter: no padding (the result does not depend on L)
    pad = (-t) % L
    f = torch.promote_types(x.dtype, torch.float32)
    x, dt, B, C, A = (v.to(f) for v in (x, dt, B, C, A))
    xs = x
    # Zero padding at the end leaves the final state exact: dt = 0 means no decay and no input.
    if pad:
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:  # the padding joins the last document, so the final state is that document's
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (t + pad) // L
    # (b, c, g, ...) leading, so every per-chunk product is one batched matmul over contiguous operands.
    X = (x * dt[..., None]).view(b, c, L, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, l, p)
    Adt = (dt * A).view(b, c, L, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, l)
    Bc = B.view(b, c, L, g, n).transpose(2, 3)  # (b, c, g, l, n)
    Cc = C.view(b, c, L, g, n).transpose(2, 3)
    A_cum = Adt.cumsum(-1)

    if seq_idx is None:
        same = entering = None
        to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, c, g, r, l)
    else:
        same, to_end, entering = _document_masks(seq_idx.reshape(b, c, L), Adt)

    # Within a chunk: a masked, attention-like quadratic form.
    scores = Cc @ Bc.transpose(-1, -2)  # (b, c, g, l, s)
    y = _DecayedScores.apply(Adt, scores, same) @ X  # (b, c, g, r, l, p)

    # Each chunk's own contribution to the state at its end.
    chunk_states = (X * to_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, c, g, r, p, n)

    # Across chunks: pass the state along, one step per chunk.
    state = (
        initial_state.to(f).view(b, g, r, p, n)
        if initial_state is not None
        else x.new_zeros(b, g, r, p, n)
    )
    chunk_decay = torch.exp(A_cum[..., -1])  # (b, c, g, r)
    start_decay = torch.exp(A_cum)  # (b, c, g, r, l)
    if entering is not None:
        # The state entering a chunk belongs to the previous chunk's last document: it carries on to a position of
        # the chunk, and through the chunk's end, only where that document goes on.
        chunk_decay = chunk_decay.masked_fill(~entering[..., -1], 0)
        start_decay = start_decay.masked_fill(~entering, 0)
    starts = []
    for i in range(c):
        starts.append(state)
        state = chunk_decay[:, i, :, :, None, None] * state + chunk_states[:, i]
    start_states = torch.stack(starts, dim=1)  # (b, c, g, r, p, n)

    # What the state at the chunk start contributes to each position in the chunk.
    y = y + (Cc[:, :, :, None] @ start_states.transpose(-1, -2)) * start_decay[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * L, h, p)[:, :t]
    if D is not None:
        y = y + D.to(f)[:, None] * xs
    return y, state.reshape(b, h, p, n)


def _document_masks(docs: torch.Tensor, Adt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs (b, c, l): the document of each position, chunk by chunk; Adt (b, c, g, r, l). Returns
    same (b, c, 1, 1, l, s): positions l and s lie in one document;
    to_end (b, c, g, r, l): each position's decay to its chunk's end, 0 outside the chunk's last document;
    entering (b, c, 1, 1, l): the position lies in the document of the state entering its chunk (the previous
    chunk's last document; for the first chunk the row's first document, which owns the initial state)."""
    same = (docs[..., :, None] == docs[..., None, :])[:, :, None, None]
    last = (docs == docs[..., -1:])[:, :, None, None]
    # Summed back from the chunk's end rather than differenced from its start: the last document's decays then never
    # round with the sums of the documents before it, so its outputs do not depend on them, bit for bit.
    after = F.pad(Adt[..., 1:].flip(-1).cumsum(-1).flip(-1), (0, 1))
    to_end = torch.exp(after).masked_fill(~last, 0)
    previous = torch.cat([docs[:, :1, :1], docs[:, :-1, -1:]], dim=1)  # (b, c, 1)
    entering = (docs == previous)[:, :, None, None]
    return same, to_end, entering


class _DecayedScores(torch.autograd.Function):
    """scores (b, c, g, l, s) weighted by each head's decay from s to l within the chunk:
    out[..., r, l, s] = scores[..., l, s] * exp(Adt[r, s+1] + ... + Adt[r, l]) for s <= l, else 0; with `same`
    (b, c, 1, 1, l, s) also 0 where l and s lie in different documents.

    The segment sums are differences of float64 cumulative sums: as accurate as summing each segment (a difference
    of fp32 cumulative sums is not, once the sums grow large). Over a chunk of fp32 values they are exact while its
    dt span a factor below about 2^29 / L (2^22 for L = 128), so a document's decays never round with the documents
    before it in the chunk. Written out forward and backward, it makes a few passes over the (l, s) products where
    autograd through the elementary ops makes three times as many. Masked entries are exactly 0 in `decay` and `out`,
    so the backward needs no mask of its own."""

    @staticmethod
    def forward(ctx, Adt, scores, same=None):
        L = Adt.shape[-1]
        total = Adt.to(torch.promote_types(Adt.dtype, torch.float64)).cumsum(-1)
        decay = (total[..., :, None] - total[..., None, :]).to(Adt.dtype)
        hidden = torch.ones(L, L, dtype=torch.bool, device=Adt.device).triu_(1)
        if same is not None:
            hidden = hidden | ~same
        decay.masked_fill_(hidden, float("-inf")).exp_()
        out = decay * scores[:, :, :, None]
        ctx.save_for_backward(decay, scores, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        decay, scores, out = ctx.saved_tensors
        grad_scores = (grad * decay).sum(3)
        # d out[l, s] / d (segment sum) = out[l, s]; the segment sum is total[l] - total[s].
        g = grad * out
        grad_total = g.sum(-1) - g.sum(-2)
        grad_Adt = grad_total.flip(-1).cumsum(-1).flip(-1)  # total[l] sums Adt[0..l]
        return grad_Adt, grad_scores, None


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. state (b, h, p, n); x (b, h, p); dt (b, h); B, C (b, g, n).

    Returns y (b, h, p) and the new state, in fp32 (float64 for float64 inputs); the caller stores the state in its
    cache dtype.
    """
    h = x.shape[1]
    f = torch.promote_types(x.dtype, torch.float32)
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    Bh, Ch = _per_head(B, h, f), _per_head(C, h, f)
    decay = torch.exp(dt * A)
    new_state = decay[..., None, None] * state.to(f) + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(f)[:, None] * x
    return y, new_state


def ssd_span(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What t successive `ssd_step` calls compute, in one batched computation that also yields the state after every
    position. state (b, h, p, n); x (b, t, h, p); dt (b, t, h); B, C (b, t, g, n).

    Returns y (b, t, h, p) and the states (b, t, h, p, n), in fp32 (float64 for float64 inputs). The work and memory
    grow with t^2 and t: meant for the few positions of a speculative verification, not for prefill.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    f = torch.promote_types(x.dtype, torch.float32)
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    # Heads leading, (b, h, t, ...) contiguous: the states are one batched matmul over (t, s) per head.
    Bh, Ch = (_per_head(v, h, f).transpose(1, 2).contiguous() for v in (B, C))
    X = (dt[..., None] * x).transpose(1, 2).contiguous()  # (b, h, t, p): what position s adds is X_s B_s^T
    # Cumulative log-decays: the decay from position s to t (s <= t) is exp(cum[t] - cum[s]), from the cached state
    # to t exp(cum[t]). Masked before the exponential: past the diagonal the differences are positive.
    cum = (dt * A).cumsum(1).transpose(1, 2)  # (b, h, t)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril_()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (b, h, t, s)
    inputs = (X[..., None] * Bh[..., None, :]).view(b, h, t, p * n)
    states = decay @ inputs + cum.exp()[..., None] * state.to(f).reshape(b, h, 1, p * n)
    states = states.view(b, h, t, p, n)
    y = (states * Ch[..., None, :]).sum(-1).transpose(1, 2)  # y_t = S_t C_t
    if D is not None:
        y = y + D.to(f)[:, None] * x
    return y, states.transpose(1, 2)


def _per_head(v: torch.Tensor, h: int, dtype: torch.dtype) -> torch.Tensor:
    """B or C (..., g, n) for each of the h heads (..., h, n): head i reads group i // (h / g)."""
    *lead, g, n = v.shape
    return v.to(dtype)[..., None, :].expand(*lead, g, h // g, n).reshape(*lead, h, n)


def _mamba_ssm_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    if seq_idx is not None:
        # mamba_ssm gives the initial state to document 0 and wants int32: number each row's documents from its first.
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32)
    y, final = mamba_chunk_scan_combined(
        x, dt, A.float(), B, C, chunk_size, D=D, initial_states=initial_state, seq_idx=seq_idx,
        return_final_states=True,
    )
    return y.float(), final.float()
