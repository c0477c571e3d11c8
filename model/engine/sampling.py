"""The sampler: logits -> the distribution a request samples from, draws by inverse CDF from per-request uniforms,
speculative acceptance (rejection sampling), and log-probabilities (of the raw or of the sampling distribution).

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

from kernels.logprobs import filtered_logits
from model.engine.params import SamplingParams


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """As filtered_logits: the sampling distribution itself, fp32 (b, ..., V)."""
    return filtered_logits(logits, temperature, top_k, top_p).softmax(-1)


def request_settings(
    params: list[SamplingParams], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i's (temperature, top_k, top_p) from params[i], as filtered_logits takes them (b,) (temperature 0 reads
    as 1: greedy rows take the argmax, which no temperature moves)."""
    return (
        torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device),
        torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
    )


def request_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filtered_logits of logits (b, ..., V) with row i's settings from params[i]."""
    return filtered_logits(logits, *request_settings(params, logits.device))


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
    if not k:  # nothing to verify: a draw from q
        return drafts.new_zeros(b), sample(target_probs[:, 0], uniforms[:, 0])
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
    return step_logprobs(torch.log_softmax(logits.float(), dim=-1)[None], tokens[None], [top])[0].proposed


@dataclass
class StepLogprobs:
    """One row's log-probabilities at the positions a step fed: the distribution (t, V) the request reports, and the
    entries of the tokens proposed there, read for the whole batch at once."""

    logp: torch.Tensor
    proposed: list[TokenLogprob]
    top: int

    def of(self, position: int, token: int) -> TokenLogprob:
        """The entry of token at position (another token than the proposed one is read from the row)."""
        if self.proposed[position].token_id == token:
            return self.proposed[position]
        return step_logprobs(self.logp[None, position : position + 1], torch.tensor([[token]]), [self.top])[0].proposed[0]


def step_logprobs(logp: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[StepLogprobs]:
    """logp (b, t, V) log-probabilities, tokens (b, t) proposed, tops[i] the alternatives row i reports: per row its
    StepLogprobs, with one gather (and one top-k) for the batch instead of one per row."""
    chosen = logp.gather(-1, tokens[..., None].to(logp.device)).squeeze(-1).tolist()
    top = max(tops)
    alternatives = None
    if top:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [[list(zip(i, v)) for i, v in zip(*row)] for row in zip(ids.tolist(), values.tolist())]
    return [
        StepLogprobs(logp[row], [
            TokenLogprob(token, lp, alternatives[row][position][: tops[row]] if tops[row] else [])
            for position, (token, lp) in enumerate(zip(ids_row, chosen[row]))
        ], tops[row])
        for row, ids_row in enumerate(tokens.tolist())
    ]
