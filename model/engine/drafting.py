"""MTP drafting: the MTP block over a step's kept positions, then k draft tokens, the block applied recursively.

The MTP cache holds the MTP block's keys and values at every position i, computed from (main hidden h_i, embedding
of token i+1), as vLLM keeps them. Depth 1 of the draft is the MTP output at a row's last kept position; depth j > 1
feeds the previous depth's hidden and draft token one position further. Those speculative MTP positions are dropped
afterwards (the next step rewrites them from real hidden states).

Functions of (model, cache, tensors) only, so that a compiled graph holds the whole drafting (`mtp_draft`: the MTP
block over the kept positions, k projections through the lm_head and draws, k - 1 recursive MTP steps): the decode
step's (model.engine.step), or a prompt chunk's own (`prompt_draft`). As k + 1 compiled calls with the projections
and draws between them in eager mode, the same work cost the tiny shape about three times the block's own compute at
batch 1 on CPU: each call's guards, wrappers and dispatch.
"""

from __future__ import annotations

import torch

from model.cache import HybridCache
from model.engine.sampling import Draws, sample
from model.hybrid import NemotronH


def mtp_positions(
    model: NemotronH, h: torch.Tensor, following: torch.Tensor, kept: torch.Tensor, cache: HybridCache
) -> torch.Tensor:
    """Write the MTP cache positions of main hiddens h (b, t, d), each paired with the token that follows it
    (b, t), and keep the first kept[i] of row i (the rest is padding the next step overwrites). Returns the MTP
    hidden at each row's last kept position (b, d): depth 1 of the draft."""
    out = model.mtp(h, model.model.embeddings(following), cache.layers)
    cache.lengths[cache.active] += kept
    return out[torch.arange(len(kept), device=kept.device), kept - 1]


def draft(
    model: NemotronH, k: int, hidden: torch.Tensor, cache: HybridCache, draws: Draws | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k draft tokens per row (b, k) from depth-1 MTP hiddens (b, d): the argmax, or with draws a sample from the
    row's sampling distribution, which is returned too (b, k, V). The MTP cache's lengths are left as they were."""
    lengths = cache.lengths[cache.active].clone()  # a view when the rows are a slice
    tokens, probs = [], []
    for depth in range(k):
        logits = model.logits(hidden)
        token = logits.argmax(-1)
        if draws is not None:
            p = draws.probs(logits)
            token = torch.where(draws.greedy, token, sample(p, draws.uniforms[:, depth]))
            probs.append(p)
        tokens.append(token)
        if depth + 1 < k:
            hidden = model.mtp(hidden[:, None], model.model.embeddings(token[:, None]), cache.layers)[:, 0]
            cache.advance(1)
    cache.lengths[cache.active] = lengths
    return torch.stack(tokens, 1), torch.stack(probs, 1) if probs else None


def mtp_draft(
    model: NemotronH, k: int, h: torch.Tensor, following: torch.Tensor, kept: torch.Tensor, cache: HybridCache,
    draws: Draws | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decode step's drafting: `mtp_positions`, then `draft` from the hidden it returns."""
    return draft(model, k, mtp_positions(model, h, following, kept, cache), cache, draws)


def prompt_draft(
    model: NemotronH, k: int, h: torch.Tensor, following: torch.Tensor, kept: torch.Tensor, cache: HybridCache,
    draws: Draws | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafting of rows that finished their prompt: `mtp_draft` over a prompt chunk. A function of its own so
    that, compiled, its graph (dynamic in the chunk's length) is not the one decode steps run (static in their
    1 + k positions, which measured faster)."""
    return mtp_draft(model, k, h, following, kept, cache, draws)
