"""Options every subcommand shares, as Annotated types, so each flag is spelled, typed and documented once.

    from n3cli.options import DEFAULT_PRESET, DryRun, Out, Preset, Sets, load_preset

    def run(preset: Preset = DEFAULT_PRESET, overrides: Sets = None, out: Out = None, dry_run: DryRun = False):
        cfg = load_preset(preset, overrides)

`--debug` is declared once, on the root command, and main() accepts it anywhere on the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from presets import DEFAULT_PRESET, RunConfig, load  # noqa: F401 (DEFAULT_PRESET: re-exported for the commands)

Preset = Annotated[
    str,
    typer.Option("--preset", "-p", help="Hardware preset: a name from `n3 presets list` or a path to a .toml file."),
]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override one preset value, e.g. train.seq_len=512. Repeatable."
    ),
]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Directory to write results to.")]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Build on the meta device and print the plan: parameters, memory, parallelism."),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (or set N3_DEBUG=1).")]


def load_preset(preset: str, overrides: list[str] | None) -> RunConfig:
    """The RunConfig `--preset` and `--set` resolve to; bad input raises UserError."""
    return load(preset, overrides or ())
