"""Writing results: JSON (and JSON lines) through a temporary file and a rename, and the RULER plot as a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.eval.lengths import length_label
from stages.eval.ruler import RulerResult


def write_text(path: Path, text: str) -> Path:
    """Write text to path atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


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
