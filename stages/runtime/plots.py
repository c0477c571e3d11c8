"""Line plots as PNGs (matplotlib, the `rlvr` extra, imported lazily): the curves of a run's metrics.jsonl, or any series."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics: Path, out: Path, keys: list[str], title: str) -> str:
    """One line per key of the records (against "step"), into `out`. Returns a line saying what was written, or why
    nothing was (matplotlib missing)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    series = {key: list(zip(*points)) for key in keys
              if (points := [(r["step"], r[key]) for r in records if r.get(key) is not None])}
    return plot_lines(series, out, "step", title)


def plot_lines(series: dict[str, tuple], out: Path, xlabel: str, title: str) -> str:
    """One line per label of `series` ({label: (xs, ys)}; a label ending in "before" is dashed) into `out`, written
    atomically. Returns a line saying what was written, or why nothing was (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {out.name}: plotting needs matplotlib (pip install 'n3[rlvr]')"
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        axes.plot(xs, ys, "--" if label.endswith("before") else "-", marker="o" if len(xs) < 20 else None,
                  label=label)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(out)
    return f"wrote {out}"
