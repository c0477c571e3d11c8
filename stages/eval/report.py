"""The RULER plot as a PNG (JSON results go through stages.runtime.files, re-exported here for the commands)."""

from __future__ import annotations

import os
from pathlib import Path

from stages.eval.lengths import length_label
from stages.eval.ruler import RulerResult
from stages.runtime.files import write_json, write_jsonl, write_text  # noqa: F401 (re-exported)


def plot_ruler(result: RulerResult, path: Path) -> Path | None:
    """Score against length: each task faint, the mean bold. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = result.options.lengths
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for task, scores in result.scores.items():
        ax.plot(lengths, [scores[n] for n in lengths], marker=".", linewidth=1, alpha=0.45, label=task)
    ax.plot(lengths, [result.mean(n) for n in lengths], marker="o", linewidth=2.5, color="black", label="mean")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.set_title("RULER")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: low scores stay visible
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
