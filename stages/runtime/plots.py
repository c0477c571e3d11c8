"""Curves of a run's metrics.jsonl as a PNG (matplotlib, the `rlvr` extra, imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics: Path, out: Path, keys: list[str], title: str) -> str:
    """One line per key of the records (against "step"), into `out`. Returns a line saying what was written, or why
    nothing was (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {out.name}: plotting needs matplotlib (pip install 'n3[rlvr]')"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points), label=key)
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(out)
    return f"wrote {out}"
