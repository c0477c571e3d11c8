"""The sampler: logits -> the distribution a request samples from, draws by inverse CDF from per-request uniforms,
speculative acceptance (rejection sampling), and log-probabilities.

Greedy rows take the argmax. Sampled rows: logits / temperature, then top-k, then top-p, then softmax. Speculative
verification follows Leviathan et al. (arXiv 2211.17192): draft j is accepted with probability min(1, q(x)/p(x));
at the first rejection the token is drawn from normalise(max(q - p, 0)); when every draft is accepted a bonus token
is drawn from q. The output then has exactly the target distribution q. Under greedy q and p are one-hot, so this is
"accept while the draft equals the argmax, then emit the argmax" (done directly, without probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits (b, ..., V); temperature, top_k (0: off), top_p (b,). The sampling distribution, fp32 (b, ..., V)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    logits = logits.float() / temperature.view(shape)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        ordered, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        k = top_k.view(shape)
        drop = (k > 0) & (rank >= k)
        ordered = ordered.masked_fill(drop, float("-inf"))
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p.view(shape)  # the mass before a token already reaches top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    return logits.softmax(-1)


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (b, V) (need not sum to 1), uniforms (b,) in [0, 1). Returns (b,) token ids; a token
    with probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def greedy_accept(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts (b, k); logits (b, k+1, V) of the target at the fed positions. Returns (accepted (b,), final (b,)):
    drafts are accepted while they equal the argmax; the final token is the argmax after the last accepted one."""
    best = logits.argmax(-1)
    accepted = (drafts == best[:, :-1]).long().cumprod(-1).sum(-1)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def speculative_accept(
    drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling. drafts (b, k) drawn from draft_probs (b, k, V); target_probs (b, k+1, V); uniforms
    (b, k+1): k for the acceptance tests and one for the final draw. Returns (accepted (b,), final (b,))."""
    b, k = drafts.shape
    q = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    p = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (uniforms[:, :k] * p < q).long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=drafts.device)
    final_q = target_probs[rows, accepted]
    # Past the last draft there is nothing to subtract (a zero row): the bonus token comes from q itself.
    final_p = F.pad(draft_probs, (0, 0, 0, 1))[rows, accepted]
    residual = (final_q - final_p).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, final_q)  # q == p: any draw from q is exact
    return accepted, sample(residual, uniforms[:, k])


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits (n, V) at the positions that produced tokens (n,): each token's log-probability and the top alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives)]
