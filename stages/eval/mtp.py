"""`n3 eval mtp`: how far the model's MTP head drafts ahead of it, measured where it matters, in self-speculative
decoding (REFERENCE.md section 5). `n3 mtp-boost` measures its before and after with the same function.

For each draft length d = 1..K the engine generates from the prompts with d MTP drafts per step and counts what it
accepts: the acceptance length at d (tokens produced per verification step: accepted drafts + the target's own
token; 1 would mean no speedup), and per draft position j the share of steps whose j-th draft was accepted
(cumulative, as vLLM counts: position j counts only when drafts 1..j were all accepted). Decode speed is timed apart,
at batch 1 on a few of the prompts, at each length alternately with the same decoding without drafts: each length's
speedup over plain decoding; the best length is the fastest.
"""

from __future__ import annotations

import time
import statistics
from dataclasses import dataclass, replace

from model.errors import UserError
from stages.rollout.backend import EngineBackend


@dataclass
class DepthRun:
    depth: int
    """Drafts per step; 0 is plain decoding."""
    verifications: int
    """Decode steps summed over requests: each verifies the drafts and emits at least the target's token."""
    generated: int
    """Tokens of the timed generation."""
    rates: list[float]
    """Per draft position j (index j - 1): the fraction of verifications that accepted draft j."""
    length: float
    """Mean acceptance length: 1 + accepted drafts per verification."""
    seconds: float
    """Wall time of the timed generation (batch 1), which `generated` counts the tokens of."""
    plain_seconds: float
    """Wall time of the same timed generation without drafts, run right before it: on a shared machine timings
    drift from one minute to the next, a ratio of neighbours much less."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.seconds if self.seconds else 0.0


@dataclass
class AcceptanceResult:
    source: str
    backend: str
    prompts: int
    temperature: float
    runs: list[DepthRun]
    """One per draft length, 1..K."""

    @property
    def rates(self) -> list[float]:
        """Per draft position at the deepest run."""
        return self.runs[-1].rates

    @property
    def conditional(self) -> list[float]:
        """Per draft position j: P(draft j accepted | drafts 1..j-1 accepted), at the deepest run."""
        return [r / prev if prev else 0.0 for r, prev in zip(self.rates, [1.0] + self.rates)]

    @property
    def plain_tokens_per_s(self) -> float:
        """Decoding without drafts: the median of the timings the runs are compared with."""
        return self.runs[0].generated / statistics.median(r.plain_seconds for r in self.runs)

    @property
    def best(self) -> DepthRun:
        """The draft length that decodes fastest."""
        return max(self.runs, key=lambda r: r.speedup)

    def summary(self) -> dict:
        return {"benchmark": "mtp", "source": self.source, "backend": self.backend, "prompts": self.prompts,
                "temperature": self.temperature, "plain_tokens_per_s": self.plain_tokens_per_s,
                "per_depth": [_run_summary(r) for r in self.runs],
                "deepest": {"acceptance_rate": self.rates, "conditional_rate": self.conditional},
                "best": {"depth": self.best.depth, "speedup": self.best.speedup}}

    @classmethod
    def from_summary(cls, summary: dict) -> AcceptanceResult:
        """The result a summary() was made from."""
        def run(d: dict) -> DepthRun:
            return DepthRun(d["depth"], d["verifications"], d["generated_tokens"], d["acceptance_rates"],
                            d["acceptance_length"], d["seconds"], d["plain_seconds"])

        return cls(summary["source"], summary["backend"], summary["prompts"], summary["temperature"],
                   [run(d) for d in summary["per_depth"]])


def _run_summary(run: DepthRun) -> dict:
    return {"depth": run.depth, "acceptance_length": run.length, "verifications": run.verifications,
            "generated_tokens": run.generated, "acceptance_rates": run.rates, "seconds": run.seconds,
            "plain_seconds": run.plain_seconds, "tokens_per_s": run.tokens_per_s, "speedup": run.speedup}


def text_prompts(ids, prefix: list[int], count: int, length: int) -> list[list[int]]:
    """count prompts of `length` tokens (prefix, then a slice of ids: a list or an array), at evenly spaced offsets."""
    need = length - len(prefix)
    if need < 1 or len(ids) < need:
        raise UserError(f"the text has {len(ids)} tokens; prompts of {length} need at least {need}")
    step = (len(ids) - need) // (count - 1) if count > 1 else 0
    return [prefix + [int(t) for t in ids[i * step : i * step + need]] for i in range(count)]


def acceptance(backend: EngineBackend, prompts: list[list[int]], max_tokens: int, source: str,
               temperature: float = 0.0, timed_prompts: int = 2, timed_tokens: int = 48, repeats: int = 3
               ) -> AcceptanceResult:
    """Generate max_tokens from each prompt at every draft length up to the backend engine's and read the engine's
    counters. Time decoding at each length at batch 1 (where speculation pays: a decode step costs about the same for
    1 token as for k + 1), `timed_tokens` from each of the first `timed_prompts` prompts, each time right after the
    same decoding without drafts, `repeats` times: the pair of the median ratio."""
    if not backend.engine.k:
        raise UserError("MTP acceptance needs speculative decoding: a draft depth of at least 1")
    timed, tokens = prompts[:timed_prompts], min(timed_tokens, max_tokens)
    runs = []
    for depth in range(1, backend.engine.k + 1):
        counted = _run(backend, depth, prompts, max_tokens, temperature)
        if not counted.verifications:
            raise UserError("no token was generated after a prompt's first; raise --max-tokens")
        pairs = sorted(((_run(backend, 0, timed, tokens, temperature, batch=1),
                         _run(backend, depth, timed, tokens, temperature, batch=1)) for _ in range(repeats)),
                       key=lambda pair: pair[0].seconds / pair[1].seconds)
        plain, speed = pairs[len(pairs) // 2]
        runs.append(replace(counted, generated=speed.generated, seconds=speed.seconds, plain_seconds=plain.seconds))
    return AcceptanceResult(source, backend.description, len(prompts), temperature, runs)


def _run(backend: EngineBackend, depth: int, prompts: list[list[int]], max_tokens: int, temperature: float,
         batch: int | None = None) -> DepthRun:
    """One generation at `depth` drafts per step in a fresh engine (its counters count this generation alone) of the
    backend's settings but for the depth; with `batch`, timed at that batch, every prompt to exactly max_tokens (the
    same work whatever the drafts) and seeded. A compiled engine compiles before the clock starts."""
    from model.engine import Engine, SamplingParams

    source = backend.engine
    config = replace(source.config, speculative_tokens=depth, max_batch=batch or source.config.max_batch)
    engine = Engine(source.model, source.tokenizer, config)
    if engine.config.compile:
        engine.warm_up()
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=batch is not None, seed=i)
              for i in range(len(prompts))]
    started = time.perf_counter()
    engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    stats = engine.stats
    return DepthRun(depth, stats.decode_rows, stats.generated_tokens, stats.acceptance_rate,
                    stats.mean_acceptance_length, seconds, 0.0)
