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
from typing import NamedTuple

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


class Draws(NamedTuple):
    """How the rows of a batch sample, for a batch where some row does not decode greedily: their settings (b,) as
    filtered_logits takes them, which rows are greedy (b,), each row's uniforms (b, n) from its request's generator
    (verification's first, then drafting's; unused by greedy rows), and whether any row truncates (top-k or top-p),
    decided on the host so that compiled code skips the sort when none does."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    uniforms: torch.Tensor
    truncate: bool

    @classmethod
    def of(cls, params: list[SamplingParams], uniforms: torch.Tensor) -> Draws:
        """Row i's settings from params[i] (temperature 0 reads as 1: greedy rows take the argmax, which no
        temperature moves) with its uniforms (b, n)."""
        device = uniforms.device
        return cls(
            torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            uniforms,
            any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
        )

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every field but `truncate`: the per-row tensors."""
        return self[:-1]

    def rows(self, index: list[int] | torch.Tensor) -> Draws:
        """The draws of some rows."""
        return Draws(*(x[index] for x in self.tensors), self.truncate)

    def after(self, n: int) -> Draws:
        """The same rows, their first n uniforms spent."""
        return self._replace(uniforms=self.uniforms[:, n:])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's sampling distribution of logits (b, ..., V), fp32."""
        return filtered_probs(logits, self.temperature, self.top_k, self.top_p, self.truncate)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log of `probs`."""
        return filtered_logits(logits, self.temperature, self.top_k, self.top_p, self.truncate).log_softmax(-1)


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    truncate: bool | None = None,
) -> torch.Tensor:
    """As filtered_logits: the sampling distribution itself, fp32 (b, ..., V)."""
    return filtered_logits(logits, temperature, top_k, top_p, truncate).softmax(-1)


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


def verify(
    drafts: torch.Tensor, logits: torch.Tensor, draft_probs: torch.Tensor | None, draws: Draws | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A step's tokens from the target's logits (b, k+1, V) at the fed positions, drafts (b, k) (k may be 0): greedy
    rows by greedy_accept, the others by speculative_accept with their draft distributions (b, k, V) and the first
    k + 1 of their uniforms. Returns (accepted (b,), final (b,), the sampling log-probabilities (b, k+1, V) of every
    row, or None when draws is None: every row greedy)."""
    accepted, final = greedy_accept(drafts, logits)
    if draws is None:
        return accepted, final, None
    k = drafts.shape[1]
    sampling = draws.log_probs(logits)
    if draft_probs is None:  # nothing drafted (k = 0)
        draft_probs = sampling.new_zeros(len(drafts), 0, sampling.shape[-1])
    a, f = speculative_accept(drafts, draft_probs, sampling.exp(), draws.uniforms[:, : k + 1])
    return torch.where(draws.greedy, accepted, a), torch.where(draws.greedy, final, f), sampling


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
