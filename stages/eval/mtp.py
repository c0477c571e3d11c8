"""`n3 eval mtp`: how far the model's MTP head drafts ahead of it, measured where it matters, in self-speculative
decoding (REFERENCE.md section 5).

Prompts are slices of a text. For each draft depth d = 1..K the engine generates from them with d MTP drafts per
step and counts what it accepts: the acceptance length at depth d (tokens produced per verification step: accepted
drafts + the target's own token; 1 would mean no speedup). The run at depth K also gives, per draft position j, the
fraction of steps whose j-th draft was accepted, and that fraction given draft j - 1 was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.errors import UserError
from stages.rollout.backend import EngineBackend


@dataclass
class DepthRun:
    depth: int
    verifications: int
    """Decode steps summed over requests: each verifies the drafts and emits at least the target's token."""
    generated: int
    rates: list[float]
    """Per draft position j (index j - 1): the fraction of verifications that accepted draft j."""
    length: float
    """Mean acceptance length: 1 + accepted drafts per verification."""


@dataclass
class AcceptanceResult:
    source: str
    backend: str
    prompts: int
    runs: list[DepthRun]
    """One per depth, 1..K."""

    @property
    def rates(self) -> list[float]:
        """Per draft position at the deepest run."""
        return self.runs[-1].rates

    @property
    def conditional(self) -> list[float]:
        """Per draft position j: P(draft j accepted | drafts 1..j-1 accepted), at the deepest run."""
        return [r / prev if prev else 0.0 for r, prev in zip(self.rates, [1.0] + self.rates)]

    def summary(self) -> dict:
        return {"benchmark": "mtp", "source": self.source, "backend": self.backend, "prompts": self.prompts,
                "per_depth": [{"depth": r.depth, "acceptance_length": r.length, "verifications": r.verifications,
                               "generated_tokens": r.generated, "acceptance_rates": r.rates} for r in self.runs],
                "deepest": {"acceptance_rate": self.rates, "conditional_rate": self.conditional}}


def text_prompts(ids, prefix: list[int], count: int, length: int) -> list[list[int]]:
    """count prompts of `length` tokens (prefix, then a slice of ids: a list or an array), at evenly spaced offsets."""
    need = length - len(prefix)
    if need < 1 or len(ids) < need:
        raise UserError(f"the text has {len(ids)} tokens; prompts of {length} need at least {need}")
    step = (len(ids) - need) // (count - 1) if count > 1 else 0
    return [prefix + [int(t) for t in ids[i * step : i * step + need]] for i in range(count)]


def acceptance(backend: EngineBackend, prompts: list[list[int]], max_tokens: int, source: str,
               temperature: float = 0.0) -> AcceptanceResult:
    """Generate max_tokens from each prompt at every depth up to the backend engine's, and read the counters."""
    from model.engine import Engine

    engine = backend.engine
    if not engine.k:
        raise UserError("MTP acceptance needs speculative decoding: a draft depth of at least 1")
    runs = []
    for depth in range(1, engine.k + 1):
        # A lower depth fits the same step budget, so the engine's other settings carry over unchanged.
        at_depth = engine if depth == engine.k else Engine(engine.model, engine.tokenizer,
                                                            replace(engine.config, speculative_tokens=depth))
        EngineBackend(at_depth, backend.description).generate(prompts, max_tokens, temperature=temperature)
        stats = at_depth.stats
        if not stats.decode_rows:
            raise UserError("no token was generated after a prompt's first; raise --max-tokens")
        runs.append(DepthRun(depth, stats.decode_rows, stats.generated_tokens, stats.acceptance_rate,
                             stats.mean_acceptance_length))
    return AcceptanceResult(source, backend.description, len(prompts), runs)
