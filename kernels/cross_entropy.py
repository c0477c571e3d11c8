"""Cross-entropy of a linear output layer without materialising all the logits: `linear_cross_entropy`.

The logits of a chunk of rows are computed, reduced to their losses, and turned into the gradients of the hidden
states and of the weight right away (softmax - one-hot), so neither the (rows, vocab) logits nor their softmax is
ever held for the whole batch. On a 131k vocabulary that is the largest activation of the model; on a CPU the chunks
also stay in cache. The gradients are computed in the forward (the loss is linear in what autograd passes back), as
Liger's fused linear cross-entropy does.
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}
"""Logits per chunk: about 4 MB on CPU (cache-sized), 512 MB on GPU (large enough for full-speed matmuls)."""


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (rows, d), weight (vocab, d), labels (rows,) with IGNORE where no loss is taken, row_weights (rows,).

    Returns the weighted sum of the row losses (fp32 scalar, differentiable in hidden and weight) and the row losses
    (rows,) fp32, detached, 0 where ignored. Logits are `hidden @ weight.T` in the ambient (autocast) precision,
    reduced in fp32.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, row_weights)
    losses = _row_losses(hidden, weight, labels)
    return (losses * row_weights).sum(), losses


def chunk_rows(weight: torch.Tensor) -> int:
    """Rows per chunk of (rows, vocab) logits through `weight`, CHUNK_ELEMENTS of them."""
    return max(1, CHUNK_ELEMENTS.get(weight.device.type, 1 << 24) // weight.shape[0])


def _row_losses(hidden, weight, labels, gradients=None, row_weights=None):
    """Losses per row; with `gradients` = (grad_hidden, grad_weight fp32) also fills them, for a loss of
    sum(row_weights * losses)."""
    losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    step = chunk_rows(weight)
    # In plain fp32 one logits buffer serves every chunk: a fresh multi-MB tensor per chunk costs page faults on CPU.
    plain = hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
    buffer = torch.empty(min(step, hidden.shape[0]), weight.shape[0], device=hidden.device) if plain else None
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        h, target = hidden[rows], labels[rows]
        valid = target != IGNORE
        safe = target.clamp(min=0)[:, None]
        logits = torch.mm(h, weight.T, out=buffer[: len(h)]) if plain else (h @ weight.T).float()
        picked = logits.gather(1, safe).squeeze(1)
        peak = logits.amax(-1, keepdim=True)
        total = logits.sub_(peak).exp_().sum(-1, keepdim=True)  # logits now hold exp(logit - peak)
        losses[rows] = ((peak + total.log()).squeeze(1) - picked) * valid
        if gradients is None:
            continue
        grad_hidden, grad_weight = gradients
        # d loss / d logits = w * (softmax - one_hot), and 0 for ignored rows.
        scale = (row_weights[rows] * valid)[:, None]
        g = logits.mul_(scale / total).scatter_add_(1, safe, -scale).to(h.dtype)
        grad_hidden[rows] = g @ weight.to(h.dtype)
        if grad_weight.dtype == h.dtype:
            grad_weight.addmm_(g.T, h)
        else:  # accumulate low-precision products in fp32
            grad_weight.add_(g.T @ h)
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, row_weights):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        losses = _row_losses(hidden, weight, labels, (grad_hidden, grad_weight), row_weights.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None
