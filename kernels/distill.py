"""KL divergence between two distributions read through one frozen linear output layer: `linear_kl`.

What `n3 mtp-boost` distills (REFERENCE.md section 4, MTP boosting): per row, KL(softmax(teacher @ W.T / T) ||
softmax(student @ W.T / T)), the teacher the backbone's hidden state, the student the MTP head's, W the shared
lm_head. Neither (rows, vocab) logits matrix is held whole: rows go in chunks, and within a chunk the vocabulary goes
in chunks through an online softmax (a running maximum rescales the running sums), in fp32 whatever the ambient
autocast. The backward recomputes each chunk's logits and needs no stored probabilities:
d KL / d student_logits = softmax(student) - softmax(teacher), so d KL / d student = (q - p) @ W / T.

Only the student takes a gradient: the teacher and W are frozen where this is used (the MTP head trains alone).
"""

from __future__ import annotations

import torch

from kernels.cross_entropy import CHUNK_ELEMENTS

VOCAB_CHUNK = 16384
"""Vocabulary columns per chunk: a 131k vocabulary goes in 8 chunks; the tiny shapes' in one."""


def linear_kl(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
              vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """student, teacher (rows, d); weight (vocab, d) -> KL(p_teacher || q_student) per row (rows,) fp32, at the
    temperature (both logits divided by it). Differentiable in `student` only."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.requires_grad or teacher.requires_grad:
        raise ValueError("linear_kl trains the student alone: detach the teacher and freeze the weight")
    return _LinearKL.apply(student, teacher, weight, temperature, vocab_chunk)


def _row_chunk(weight: torch.Tensor, vocab_chunk: int) -> int:
    return max(1, CHUNK_ELEMENTS.get(weight.device.type, 1 << 24) // min(vocab_chunk, weight.shape[0]))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    return (hidden.float() @ weight.float().T) / temperature


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, vocab_chunk):
        rows, vocab = student.shape[0], weight.shape[0]
        step = _row_chunk(weight, vocab_chunk)
        kl = student.new_zeros(rows, dtype=torch.float32)
        lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
        with torch.autocast(student.device.type, enabled=False):
            for r in range(0, rows, step):
                s_rows, t_rows = student[r : r + step], teacher[r : r + step]
                n = s_rows.shape[0]
                peak = kl.new_full((n,), float("-inf"))
                mass = kl.new_zeros(n)    # sum exp(z_t - peak)
                gap = kl.new_zeros(n)     # sum exp(z_t - peak) (z_t - z_s)
                s_lse = kl.new_full((n,), float("-inf"))
                for c in range(0, vocab, vocab_chunk):
                    w = weight[c : c + vocab_chunk]
                    z_s, z_t = _logits(s_rows, w, temperature), _logits(t_rows, w, temperature)
                    new_peak = torch.maximum(peak, z_t.max(-1).values)
                    rescale = torch.exp(peak - new_peak)
                    e = torch.exp(z_t - new_peak[:, None])
                    mass = mass * rescale + e.sum(-1)
                    gap = gap * rescale + (e * (z_t - z_s)).sum(-1)
                    peak = new_peak
                    s_lse = torch.logaddexp(s_lse, torch.logsumexp(z_s, -1))
                t_lse = peak + torch.log(mass)
                # KL = sum p (z_t - z_s) - lse_t + lse_s
                kl[r : r + n] = gap / mass - t_lse + s_lse
                lse_s[r : r + n], lse_t[r : r + n] = s_lse, t_lse
        ctx.save_for_backward(student, teacher, weight, lse_s, lse_t)
        ctx.temperature, ctx.vocab_chunk = temperature, vocab_chunk
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, weight, lse_s, lse_t = ctx.saved_tensors
        temperature, vocab_chunk = ctx.temperature, ctx.vocab_chunk
        step = _row_chunk(weight, vocab_chunk)
        grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        with torch.autocast(student.device.type, enabled=False):
            for r in range(0, student.shape[0], step):
                rows = slice(r, r + step)
                g = grad_kl[rows].float()[:, None] / temperature
                for c in range(0, weight.shape[0], vocab_chunk):
                    w = weight[c : c + vocab_chunk]
                    q = torch.exp(_logits(student[rows], w, temperature) - lse_s[rows, None])
                    p = torch.exp(_logits(teacher[rows], w, temperature) - lse_t[rows, None])
                    grad[rows] += ((q - p) * g) @ w.float()
        return grad.to(student.dtype), None, None, None, None
