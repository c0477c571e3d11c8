"""Log-probabilities of chosen tokens through a linear output layer, differentiable, chunked: `linear_logprobs`.

What policy-gradient losses need from the model: log pi(token | prefix) of each sampled token, under the distribution
the token was sampled from (the engine's sampler, model/engine/sampling.py: logits / temperature, then top-k, then
top-p), and the entropy of that distribution as a statistic. The (rows, vocab) logits are computed a chunk of rows
at a time, as linear_cross_entropy computes them.

The backward needs each chunk's probabilities: d log p(y) / d logits = one_hot(y) - p, divided by the temperature.
The forward keeps them while the whole selection's fit in KEEP_BYTES (a CPU micro-batch: tens of MB), so the
backward is two matmuls a chunk; past that, and always on a GPU, where memory is what bounds a batch, it keeps
nothing and recomputes each chunk's logits in the backward.

Under top-k / top-p the kept set is read from the current logits and treated as a constant (it has no gradient),
and the log-probability is renormalised over it: the same truncation the sampler applied, so the importance ratio
against the engine's log-probs is unbiased. A token outside the kept set gets -inf, as it could not have been drawn,
and no gradient.
"""

from __future__ import annotations

import torch

from kernels.cross_entropy import chunk_rows

KEEP_BYTES = {"cpu": 1 << 30, "cuda": 0}
"""The most fp32 probabilities the forward keeps for the backward; past it the backward recomputes them."""


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (rows, d), weight (vocab, d), tokens (rows,) -> (logp (rows,) fp32 differentiable, entropy (rows,) fp32
    detached) of the sampling distribution softmax(truncate(hidden @ weight.T / temperature))."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities of samples, got {temperature}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLogprobs.apply(hidden, weight, tokens, (temperature, top_k, top_p))
    logp, entropy, _ = _forward(hidden, weight, tokens, (temperature, top_k, top_p), keep=False)
    return logp, entropy


def filtered_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    truncate: bool | None = None,
) -> torch.Tensor:
    """logits (b, ..., V); temperature, top_k (0: off), top_p (b,). The sampling distribution as logits, fp32
    (b, ..., V): divided by the temperature, -inf outside the top-k and then the top-p nucleus. Differentiable in
    the kept logits; which tokens are kept is read from the values, without a gradient. The one definition of the
    distribution the engine samples from (model.engine.sampling) and the learner scores (linear_logprobs).
    `truncate` False skips the top-k and top-p pass (the caller knows no row asks for it); None decides from the
    settings, except in compiled code, which then truncates (a host-side test would split its graph; it drops
    nothing where no row asks)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    logits = logits.float() / temperature.view(shape)
    if truncate is None:
        truncate = torch.compiler.is_compiling() or bool((top_k > 0).any()) or bool((top_p < 1).any())
    if not truncate:
        return logits
    ordered, order = logits.detach().sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k, p = top_k.view(shape), top_p.view(shape)
    drop = (k > 0) & (rank >= k)
    probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
    drop = drop | ((p < 1) & (probs.cumsum(-1) - probs >= p))  # the mass before a token reaches top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))


def _chunk(hidden, weight, tokens, sampling):
    """One chunk of rows -> (logp, entropy, probabilities) of the sampling distribution, fp32. In place on the
    chunk's logits: each pass over a (rows, vocab) block costs as much as the small matmul that made it."""
    temperature, top_k, top_p = sampling
    logits = (hidden @ weight.to(hidden.dtype).T).float()  # the backward recomputes outside the forward's autocast
    if temperature != 1:
        logits.div_(temperature)
    truncate = top_k > 0 or top_p < 1
    if truncate:
        ones = torch.ones(len(tokens), device=hidden.device)
        logits = filtered_logits(logits, ones, ones * top_k, ones * top_p, truncate)
    logits.sub_(logits.amax(-1, keepdim=True))  # the kept set is never empty: the peak is finite
    picked = logits.gather(1, tokens[:, None]).squeeze(1)  # -inf outside the kept set
    if truncate:  # exp still gives 0 there, and p log p is 0 rather than 0 x -inf
        logits.clamp_(min=torch.finfo(logits.dtype).min)
    probs = logits.exp()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log().squeeze(1)
    # entropy = -sum p (z - log_total) = log_total - sum p z, the sum a batched dot product (no temporary block).
    entropy = log_total - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    return picked - log_total, entropy, probs


def _forward(hidden, weight, tokens, sampling, keep: bool):
    """Every chunk's (logp, entropy); with `keep`, also the list of their probabilities."""
    step = chunk_rows(weight)
    logps, entropies, kept = [], [], []
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        logp, entropy, probs = _chunk(hidden[rows], weight, tokens[rows], sampling)
        logps.append(logp)
        entropies.append(entropy)
        if keep:
            kept.append(probs)
    if not logps:  # two tensors: the autograd function marks the entropy alone non-differentiable
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32), kept
    return torch.cat(logps), torch.cat(entropies), kept


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, sampling):
        keep = hidden.shape[0] * weight.shape[0] * 4 <= KEEP_BYTES.get(hidden.device.type, 0)
        logp, entropy, kept = _forward(hidden, weight, tokens, sampling, keep)
        ctx.save_for_backward(hidden, weight, tokens, logp)
        ctx.sampling, ctx.kept = sampling, kept
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, tokens, logp = ctx.saved_tensors
        temperature = ctx.sampling[0]
        # An empty selection still returns a zero gradient: a rank with nothing to train joins the data-parallel
        # reduction all the same.
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        step = chunk_rows(weight)
        for i, start in enumerate(range(0, hidden.shape[0], step)):
            rows = slice(start, start + step)
            h, target = hidden[rows], tokens[rows][:, None]
            probs = ctx.kept[i] if ctx.kept else _chunk(h, weight, tokens[rows], ctx.sampling)[2]
            # A token outside the kept set (logp -inf) has no gradient.
            scale = (grad_logp[rows].float() * logp[rows].isfinite() / temperature)[:, None]
            g = probs.mul_(-scale).scatter_add_(1, target, scale).to(h.dtype)  # scale x (one_hot - p)
            grad_hidden[rows] = g @ weight.to(h.dtype)
            grad_weight.add_(g.T @ h)
        ctx.kept = None
        return grad_hidden, grad_weight.to(weight.dtype), None, None
