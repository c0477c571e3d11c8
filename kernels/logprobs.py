"""Log-probabilities of chosen tokens through a linear output layer, differentiable, chunked: `linear_logprobs`.

What policy-gradient losses need from the model: log pi(token | prefix) of each sampled token, under the distribution
the token was sampled from (the engine's sampler, model/engine/sampling.py: logits / temperature, then top-k, then
top-p), and the entropy of that distribution as a statistic. The (rows, vocab) logits are never held for the whole
batch: each chunk of rows is computed and reduced in the forward and computed again in the backward (activation
checkpointing per chunk), as linear_cross_entropy keeps memory to one chunk.

Under top-k / top-p the kept set is read from the current logits and treated as a constant (it has no gradient),
and the log-probability is renormalised over it: the same truncation the sampler applied, so the importance ratio
against the engine's log-probs is unbiased. A token outside the kept set gets -inf, as it could not have been drawn.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kernels.cross_entropy import CHUNK_ELEMENTS


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (rows, d), weight (vocab, d), tokens (rows,) -> (logp (rows,) fp32 differentiable, entropy (rows,) fp32
    detached) of the sampling distribution softmax(truncate(hidden @ weight.T / temperature))."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities of samples, got {temperature}")
    step = max(1, CHUNK_ELEMENTS.get(weight.device.type, 1 << 24) // weight.shape[0])
    logps, entropies = [], []
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # An empty selection still runs once: its zero loss must reach the weights (a rank with nothing to train
    # joins the data-parallel reduction all the same).
    for start in range(0, max(1, hidden.shape[0]), step):
        rows = slice(start, start + step)
        args = (hidden[rows], weight, tokens[rows], temperature, top_k, top_p)
        logp, entropy = checkpoint(_chunk, *args, use_reentrant=False) if differentiable else _chunk(*args)
        logps.append(logp)
        entropies.append(entropy.detach())
    return torch.cat(logps), torch.cat(entropies)


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


def _chunk(hidden, weight, tokens, temperature, top_k, top_p):
    logits = hidden @ weight.T
    rows = torch.full((len(tokens),), 1, device=logits.device)
    logits = filtered_logits(logits, rows * temperature, rows * top_k, rows * top_p)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    probs = logp_all.detach().exp()
    entropy = -(probs * logp_all.detach().nan_to_num(neginf=0.0)).sum(-1)
    return logp, entropy
