"""Two implementations of one training step timed against each other in one process, a step of each in turn, so
that whatever else the machine does falls on both alike."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

WARMUP = 2
"""Steps of each run before any is measured (compiles, caches, allocator)."""


def allocator() -> str:
    """The glibc allocator settings this process runs under, for a benchmark's report. A step that allocates and
    frees large tensors faults their pages in again each time under glibc's defaults, which can cost more than the
    arithmetic; `env MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824`
    keeps freed memory instead."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    return " ".join(settings) or "glibc defaults"


def alternate(steps: dict[str, Callable[[int], dict]], total: int, after_first: Callable[[], None] | None = None
              ) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """Step i of each of `steps` (name: step(i) -> figures) in turn, for i < total; past the first WARMUP steps each
    one's wall seconds and figures are kept. `after_first` runs once after step 0 (the check that both sides saw the
    same inputs). Returns (seconds, figures), each by name."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    outs: dict[str, list[dict]] = {name: [] for name in steps}
    for i in range(total):
        for name, step in steps.items():
            start = time.perf_counter()
            out = step(i)
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
                outs[name].append(out)
        if i == 0 and after_first is not None:
            after_first()
    return times, outs
