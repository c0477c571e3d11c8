"""Running a recipe's steps: each as its own `n3` process, the way a user would type it, resumable.

A finished step (its marker file exists) is skipped; a killed one continues with --resume where its stage has it,
else starts again. Each process writes to <root>/logs/<step>.log; <root>/recipe.json records every attempt (the
command, when it started, how long it ran, how it ended), which is where the report's wall times come from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from n3cli.recipe.steps import Step
from stages.runtime.files import write_json

STATE = "recipe.json"


@dataclass
class StepFailed(Exception):
    step: Step
    status: int
    log: Path
    last_line: str


def read_state(root: Path) -> dict:
    """What earlier runs of the recipe in `root` recorded: {"steps": {name: {"attempts": [...]}}}."""
    import json

    path = root / STATE
    if not path.is_file():
        return {"steps": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt (not JSON); move it away to start the record afresh") from None


def step_seconds(state: dict, name: str) -> float | None:
    """Wall time a step took over all its attempts (a killed attempt counts until its log was last written)."""
    attempts = state["steps"].get(name, {}).get("attempts", [])
    if not attempts:
        return None
    return sum(a.get("seconds") or max(a.get("last_write", a["started"]) - a["started"], 0.0) for a in attempts)


def check_inputs(steps: list[Step], selected: list[Step]) -> None:
    """Every input of the selected steps exists or is made by a step selected before it; else say what makes it."""
    made = set()
    for step in selected:
        for path in step.inputs:
            if str(path) not in made and not _finished(steps, path):
                maker = _maker(steps, path)
                raise UserError(f"{step.name} needs {path}, which does not exist yet: `n3 recipe --until "
                                f"{maker.name}` makes it (or by hand: {maker.command})")
        made.add(str(step.out))


NEEDS = {"quantize": ("modelopt", "quantize"), "eval-ruler": ("wonderwords", "eval")}
"""Step (its name, or its stage) -> (a module it imports, the extra that installs it), for what the core install
lacks."""


def check_packages(selected: list[Step]) -> None:
    """Refuse before the first step where a selected step would stop for a package that is not installed."""
    import importlib.util

    for step in selected:
        module, extra = NEEDS.get(step.name) or NEEDS.get(step.stage) or (None, None)
        if module and importlib.util.find_spec(module) is None:
            raise UserError(f"step {step.name} needs {module}, which is not installed: pip install 'n3[recipe]' "
                            f"(or 'n3[{extra}]') and run `n3 recipe` again")


def _finished(steps: list[Step], path: Path) -> bool:
    maker = _maker(steps, path)
    return maker.done if maker is not None else path.exists()


def _maker(steps: list[Step], path: Path) -> Step | None:
    """The step that writes folder `path`; None for a folder no step writes (a user's corpus)."""
    return next((s for s in steps if str(s.out) == str(path)), None)


def run_steps(selected: list[Step], root: Path, announce: Callable[[Step, str], None],
              finished: Callable[[Step], None], launch: Callable[[list[str], Path], int] | None = None) -> None:
    """Run every selected step not done yet, in order. `announce(step, how)` hears each one before it starts ("skip",
    "run", "resume"); `finished(step)` after each one that ran. Raises StepFailed at the first that fails."""
    launch = launch or run_command
    state = read_state(root)
    for step in selected:
        if step.done:
            announce(step, "skip")
            continue
        how = "resume" if step.resumable else "run"
        argv = step.resume_argv() if how == "resume" else step.argv
        announce(step, how)
        log = root / "logs" / f"{step.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        attempt = {"command": " ".join(argv), "how": how, "started": time.time()}
        state["steps"].setdefault(step.name, {"attempts": []})["attempts"].append(attempt)
        write_json(root / STATE, state)
        status = launch(argv, log)
        attempt.update(seconds=time.time() - attempt["started"], status=status)
        write_json(root / STATE, state)
        if status != 0 or not step.done:
            raise StepFailed(step, status or 1, log, _last_line(log))
        finished(step)


def run_command(argv: list[str], log: Path) -> int:
    """Run `n3 ...` (argv from "n3") in a child process with this Python, its output appended to `log`."""
    env = dict(os.environ, COLUMNS=os.environ.get("COLUMNS", "120"))
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        child = subprocess.Popen([sys.executable, "-m", "n3cli", *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        try:
            return child.wait()
        except BaseException:  # Ctrl-C or a kill of the recipe: stop the step too; --resume continues it
            child.terminate()
            child.wait()
            raise


def _die_with_parent() -> None:
    """In the child, before it starts: ask Linux to stop it if the recipe dies (even by SIGKILL), so a killed
    recipe leaves no stage running; --resume continues it. Elsewhere nothing happens."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def note_last_write(root: Path) -> None:
    """Record, for an attempt that never ended (the recipe was killed), when its log was last written."""
    state = read_state(root)
    changed = False
    for name, record in state["steps"].items():
        for attempt in record["attempts"]:
            log = root / "logs" / f"{name}.log"
            if "seconds" not in attempt and "last_write" not in attempt and log.is_file():
                attempt["last_write"] = log.stat().st_mtime
                changed = True
    if changed:
        write_json(root / STATE, state)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]
