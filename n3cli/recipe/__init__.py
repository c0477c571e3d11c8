"""`n3 recipe`: the whole Nemotron 3 pipeline in one resumable command, with a report of what each stage bought.

    n3 recipe                                   presets/recipes/tiny.toml on the cpu preset, into runs/recipe/
    n3 recipe --dry-run                         the steps, their commands, inputs, outputs and estimated times
    n3 recipe --until sft                       data, pretrain, extend and sft only
    n3 recipe --from mopd --cycles 1            mopd and what follows, again (earlier outputs are set aside)
    n3 recipe --recipe ultra --dry-run          the published Ultra settings on the GPU presets

Each step is the `n3` command a user would type (the report lists them), run as its own process; stopping the
recipe and running it again skips what finished and resumes what was cut off.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from n3cli.options import DryRun, Out

DEFAULT_ROOT = Path("runs") / "recipe"
"""Where the default recipe runs; another recipe runs in runs/recipe-<its name>, so their steps never mix."""


def run(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="A recipe file, or a built-in one's name (tiny, "
                                        "ultra; presets/recipes/). Runs in runs/recipe (tiny) or runs/recipe-NAME "
                                        "unless --out says.")] = "tiny",
    start: Annotated[str | None, typer.Option("--from", metavar="STAGE", help="Run this stage (or step, e.g. "
                                              "mopd-2) and everything after it again; their earlier outputs are "
                                              "moved to <out>/previous/.")] = None,
    until: Annotated[str | None, typer.Option("--until", metavar="STAGE", help="Stop after this stage's last step "
                                              "(or after this step).")] = None,
    cycles: Annotated[int | None, typer.Option(min=1, help="MOPD iterations, each with teachers re-trained from the "
                                               "student of the one before (default: the recipe's cycles).")] = None,
    out: Out = None,
    dry_run: DryRun = False,
) -> None:
    """Run data -> pretrain -> extend -> sft -> rlvr teachers -> mopd (per cycle) -> mtp-boost -> quantize -> eval,
    each stage on the one before's output, and report what each stage moved."""
    from n3cli.recipe.book import DEFAULT_RECIPE, load_recipe
    from n3cli.recipe.runner import check_inputs, check_packages, note_last_write, read_state
    from n3cli.recipe.steps import plan_steps, select

    book = load_recipe(recipe)
    root = out or (DEFAULT_ROOT if recipe == DEFAULT_RECIPE else DEFAULT_ROOT.with_name(f"recipe-{book.path.stem}"))
    steps = plan_steps(book, root, cycles)
    selected = select(steps, start, until)
    if dry_run:
        _print_plan(book, steps, selected, read_state(root))
        return
    check_inputs(steps, selected)
    check_packages(selected)
    root.mkdir(parents=True, exist_ok=True)
    note_last_write(root)
    if start is not None:
        _set_aside(selected, root)
    _run(book, steps, selected, root)


def _run(book, steps, selected, root: Path) -> None:
    from n3cli.recipe.report import figures, write_report
    from n3cli.recipe.runner import StepFailed, read_state, run_steps
    from n3cli.report import console

    started = time.time()

    def announce(step, how: str) -> None:
        index = steps.index(step) + 1
        if how == "skip":
            console.print(f"[dim][{index}/{len(steps)}] {step.name}: done before, skipped[/dim]")
            return
        verb = "resuming" if how == "resume" else "running"
        console.print(f"[{index}/{len(steps)}] {step.name}: {verb} [bold]{step.command}[/bold]  (log: "
                      f"{root / 'logs' / (step.name + '.log')})", soft_wrap=True)

    def finished(step) -> None:
        rows = figures(steps, read_state(root))
        write_report(root, book.path, rows, steps)
        row = next((f for f in rows if f.step == step.name), None)
        if row is not None:
            console.print(f"    {row.figure}: {row.before} -> {row.after}", soft_wrap=True)

    try:
        run_steps(selected, root, announce, finished)
    except StepFailed as e:
        from model.errors import UserError

        raise UserError(f"step {e.step.name} failed (exit {e.status}): {e.last_line} (log: {e.log}); fix it and run "
                        "`n3 recipe` again to go on from there") from None
    rows = figures(steps, read_state(root))
    report = write_report(root, book.path, rows, steps)
    _print_figures(rows)
    console.print(f"this run: {time.time() - started:.0f} s; report: {report}")


def _print_figures(rows) -> None:
    from rich.table import Table

    from n3cli.recipe.report import verdict, wall
    from n3cli.report import console

    table = Table("step", "wall time", "figure", "before", "after", "", title="What each stage bought")
    for f in rows:
        table.add_row(f.step, wall(f.seconds), f.figure, f.before, f.after, verdict(f),
                      style="red" if f.improved is False else None)
    console.print(table)


def _print_plan(book, steps, selected, state) -> None:
    from rich.table import Table

    import presets
    from n3cli.recipe.estimate import estimate_seconds
    from n3cli.recipe.report import wall
    from n3cli.recipe.runner import step_seconds
    from n3cli.report import console

    console.print(f"recipe: {book.path}" + (f" ({book.description})" if book.description else ""))
    table = Table("#", "step", "state", "reads", "writes", "time", title=f"{len(selected)} of {len(steps)} steps")
    total, unknown = 0.0, False
    for step in selected:
        spec = book.stages[step.stage]
        measured = step_seconds(state, step.name)
        if step.done and measured is not None:
            seconds, how = measured, "measured"
        else:
            seconds = estimate_seconds(step.stage, presets.load(spec.preset, step.sets), step.kind,
                                       spec.evals.get(step.kind, spec.options))
            how = "estimated"
        unknown |= seconds is None
        total += seconds or 0.0
        condition = "done" if step.done else "resumes" if step.resumable else "to run"
        table.add_row(str(steps.index(step) + 1), step.name, condition,
                      ", ".join(step.made_by.values()) or "-", str(step.out),
                      "unknown" if seconds is None else f"{wall(seconds)} ({how})")
    console.print(table)
    console.print(f"total: {wall(total)}" + (" and the steps of unknown time" if unknown else "")
                  + " (estimates: n3cli/recipe/estimate.py; a factor of two either way)")
    console.print("commands:")
    for step in selected:
        console.print(f"  {step.command}", soft_wrap=True, markup=False, highlight=False)


def _set_aside(selected, root: Path) -> None:
    """Move the selected steps' earlier outputs and logs to <root>/previous/<time>/ and forget their attempts, so
    they run again from scratch."""
    from n3cli.recipe.runner import STATE, read_state
    from n3cli.report import console
    from stages.runtime.files import write_json

    aside = root / "previous" / time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for step in selected:
        for path in (step.out, root / "logs" / f"{step.name}.log"):
            if path.exists():
                target = aside / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
                moved.append(step.name)
    state = read_state(root)
    for step in selected:
        state["steps"].pop(step.name, None)
    write_json(root / STATE, state)
    if moved:
        console.print(f"moved the earlier outputs of {', '.join(dict.fromkeys(moved))} to {aside}")
