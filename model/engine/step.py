"""The decode step as one function of (model, caches, tensors), which the engine compiles into one graph: the
backbone over each row's pending token and its k drafts, the lm_head, the verification (model.engine.sampling.verify:
greedy rows and sampled ones alike) and, with speculation, the drafting of the next k tokens from the positions the
verification keeps (model.engine.drafting).

The engine then appends the tokens on the host, where requests may end or the thinking budget may force a token; the
drafting assumed every row keeps its accepted drafts and the token after them, and the engine drafts again for a row
whose last kept token was replaced. As separate graphs with the lm_head, verification and bookkeeping run eagerly
between them, the same step cost the tiny shape about 0.4 ms more at batch 1 on CPU: each graph call's guards and
wrappers, and a few dozen small eager ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.cache import HybridCache
from model.engine import drafting
from model.engine.sampling import Draws, verify
from model.hybrid import NemotronH


class Step(NamedTuple):
    """What a decode step produced, per row: the target's logits (b, 1 + k, V) and hiddens (b, 1 + k, d) at the fed
    positions, the drafts accepted (b,), the token after them (b,), the sampling log-probabilities (b, 1 + k, V) (None
    when every row is greedy), and the next drafts (b, k) with their distributions (b, k, V) (None without speculation;
    the distributions None too when every row is greedy)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    accepted: torch.Tensor
    final: torch.Tensor
    sampling: torch.Tensor | None
    drafts: torch.Tensor | None
    draft_probs: torch.Tensor | None


def decode_step(
    model: NemotronH, k: int, fed: torch.Tensor, cache: HybridCache, mtp_cache: HybridCache | None,
    draft_probs: torch.Tensor | None, draws: Draws | None,
) -> Step:
    """fed (b, 1 + k): each row's pending token and its k drafts, whose distributions are draft_probs (b, k, V) for
    rows that sample; draws' uniforms (b, 2k + 1): k + 1 for the verification, k for the drafting. The cache's
    selection keeps the Mamba state after every position (for the engine's rewind); the MTP cache gets the kept
    positions, its lengths advanced by accepted + 1."""
    h = model.model(fed, cache)
    logits = model.logits(h)
    accepted, final, sampling = verify(fed[:, 1:], logits, draft_probs, draws)
    if not k:
        return Step(logits, h, accepted, final, sampling, None, None)
    # MTP position i pairs h_i with the token after it: the accepted drafts, then the final token (padding past it).
    positions = torch.arange(1 + k, device=fed.device)
    following = torch.where(positions < accepted[:, None], F.pad(fed[:, 1:], (0, 1)), final[:, None])
    drafts, probs = drafting.mtp_draft(
        model, k, h, following, accepted + 1, mtp_cache, None if draws is None else draws.after(k + 1)
    )
    return Step(logits, h, accepted, final, sampling, drafts, probs)
