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
Checkpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="A checkpoint directory (n3's, or a Hugging Face NemotronH one such as a "
                 "released Nemotron 3 model) or a run folder (its newest checkpoint). Default: the newest run under "
                 "runs/ that this command starts from."),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint, with its saved preset.")
]
ChatData = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", metavar="[NAME=]PATH", help="Chat rows in OpenAI form: .jsonl, .json or .parquet "
                 "files, a Hugging Face datasets folder, or a folder of such files. Repeatable. Default: the built-in "
                 "verifiable tasks."),
]
Weights = Annotated[
    list[str] | None,
    typer.Option("--weight", metavar="NAME=W", help="Weight of source NAME in the mix (2: twice its share). Repeatable."),
]


def load_preset(preset: str, overrides: list[str] | None) -> RunConfig:
    """The RunConfig `--preset` and `--set` resolve to; bad input raises UserError."""
    return load(preset, overrides or ())


def resumed_preset(run_dir: Path, preset: str, overrides: list[str] | None) -> RunConfig:
    """The preset a run folder saved when it started (what --resume continues with), with `--set` on top."""
    from model.errors import UserError

    saved = sorted(run_dir.glob("*.toml"))
    if len(saved) != 1:
        raise UserError(f"cannot resume: {run_dir} is not a run folder (no saved preset); drop --resume")
    if preset != DEFAULT_PRESET:
        raise UserError("--resume continues with the run's saved preset; drop --preset (--set still applies)")
    return load_preset(str(saved[0].resolve()), overrides)


def stage_preset(
    preset: str, overrides: list[str] | None, run_name: str, out: Path | None, resume: bool,
    options: dict[str, object] | None = None,
) -> tuple[RunConfig, Path]:
    """A stage command's RunConfig and run folder: `--preset` with `--set` and the command's own options on top
    (options maps preset keys to the values given; None is not given), and `--out` or runs/<preset>-<run_name>; with
    --resume, the preset that folder saved, with the same on top."""
    sets = [*(overrides or []), *(f"{key}={value}" for key, value in (options or {}).items() if value is not None)]
    cfg = load_preset(preset, sets)
    run_dir = out or Path("runs") / f"{cfg.name}-{run_name}"
    return (resumed_preset(run_dir, preset, sets) if resume else cfg), run_dir


def default_checkpoint(checkpoint: Path | None, resume: bool, made_by: tuple[str, ...], role: str = "",
                       required: bool = True) -> Path | None:
    """--checkpoint as given, or (a new run) the newest run under runs/ that one of the stages `made_by` wrote, the
    first named as the one to run; a clear error when there is none and one is `required`. `role` says what the
    checkpoint is ("the student")."""
    if checkpoint is not None or resume:
        return checkpoint
    from model.errors import UserError
    from stages.runtime.checkpointing import newest_run

    found = newest_run(Path("runs"), made_by)
    if found is None and required:
        names = made_by[0] if len(made_by) == 1 else f"{', '.join(made_by[:-1])} or {made_by[-1]}"
        raise UserError(f"give --checkpoint DIR{f', {role}' if role else ''} (no run under runs/ is an n3 {names} run; "
                        f"`n3 {made_by[0]}` makes one)")
    return found


def parse_weights(items: list[str] | None) -> dict[str, float]:
    """`NAME=W` options as {name: weight}."""
    from model.errors import UserError

    weights = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--weight expects NAME=NUMBER, got {item!r}") from None
    return weights
