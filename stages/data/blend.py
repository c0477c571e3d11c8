"""Blend weights and the two-phase curriculum (REFERENCE.md section 2: diversity first, quality for the last 25%).

Phase 1 samples each source in proportion to its training tokens times the user's weight (1 keeps its natural
share, 2 samples it twice as often). Phase 2 multiplies the weight of the sources marked as quality by the boost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.errors import UserError
from stages.runtime.corpus import Phase, SourceEntry


@dataclass
class BlendOptions:
    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> multiplier on its natural share; sources not named keep 1."""
    quality: list[str] | None = None
    """Names of the quality sources; None keeps each source's own mark (the built-in docs are marked)."""
    quality_boost: float = 4.0
    switch_at: float = 0.75

    def check(self, names: list[str]) -> None:
        for option, given in (("--weight", list(self.weights)), ("--quality", self.quality or [])):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise UserError(f"{option} names unknown source {unknown[0]!r}; sources are {', '.join(names)}")
        bad = [name for name, w in self.weights.items() if not w > 0]
        if bad:
            raise UserError(f"--weight {bad[0]}={self.weights[bad[0]]}: weights must be above 0")
        if not 0 < self.switch_at <= 1:
            raise UserError(f"--switch-at {self.switch_at}: the curriculum switch is a fraction in (0, 1]")
        if self.quality_boost < 1:
            raise UserError(f"--quality-boost {self.quality_boost}: must be at least 1")


def curriculum(sources: list[SourceEntry], boost: float) -> tuple[list[Phase], list[str]]:
    """The two phases' normalised weights, and notes for the user."""
    natural = {s.name: s.splits["train"].tokens * s.weight for s in sources}
    boosted = {s.name: natural[s.name] * (boost if s.quality else 1.0) for s in sources}
    notes = []
    if not any(s.quality for s in sources):
        notes.append("no source is marked as quality: phase 2 samples like phase 1 (mark one with --quality)")
    return [Phase("diversity", _normalise(natural)), Phase("quality", _normalise(boosted))], notes


def _normalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}
