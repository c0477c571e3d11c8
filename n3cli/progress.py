"""Rich progress bars for the stages' Progress protocol (stages/runtime/progress.py): one bar per phase, the step's
figures beside it, notes and warnings printed above it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from n3cli.report import human

console = Console(stderr=True)


class RichProgress:
    """Use as a context manager around the stage call."""

    def __init__(self) -> None:
        self.bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=console,
            # Drawn on a terminal only: written to a file or a pipe a bar would be its final state, printed above
            # the summary that says the same, or above the one line of an error that cut the work short.
            disable=not console.is_terminal,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.bars.stop()

    def start(self, description: str, total: float | None = None, completed: float = 0) -> None:
        if self.task is None:
            self.bars.start()  # on the first phase: an error before any work prints its one line and nothing else
        else:
            self.bars.update(self.task, completed=self.bars.tasks[self.task].total)
        self.task = self.bars.add_task(description, total=total, completed=completed, figures="")

    def advance(self, amount: float = 1, **fields: object) -> None:
        self.bars.update(self.task, advance=amount, figures=_figures(fields))

    def note(self, message: str) -> None:
        self.bars.console.print(message)


@contextlib.contextmanager
def training_session(cfg) -> Iterator[tuple[RichProgress | None, str]]:
    """What every training command runs its stage in: progress bars on rank 0 (None on the other ranks, which print
    nothing) and the resolved preset as TOML (saved with the run, for --resume); the process group is torn down
    after, however the stage ends."""
    from n3cli.presets import to_toml
    from presets import as_dict
    from stages.runtime import distributed

    progress = RichProgress() if os.environ.get("RANK", "0") == "0" else None
    try:
        with progress or contextlib.nullcontext():
            yield progress, to_toml(as_dict(cfg))
    finally:
        distributed.teardown()


def _figures(fields: dict) -> str:
    shown = []
    for key, value in fields.items():
        if value is None:
            continue
        if key == "tokens_per_s":
            shown.append(f"{human(value)} tok/s")
        elif key == "mfu":
            shown.append(f"MFU {100 * value:.1f}%")
        elif key == "lr":
            shown.append(f"lr {value:.2e}")
        else:
            shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(shown)
