"""`n3 rlvr`: reinforcement learning with verifiable rewards (REFERENCE.md section 4), and `n3 rlvr score`, which
scores completions in an environment as training would: how a reward function is debugged.

    n3 rlvr score --env math --input replies.jsonl               rows {"answer", "completion"}
    n3 rlvr score --env code --input replies.jsonl --json        rows {"tests", "completion"}; a JSON line per row
    n3 rlvr score --env mypkg.envs:Judge --input replies.jsonl   your class; its score() gets the row as data
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from n3cli.options import (
    DEFAULT_PRESET,
    Checkpoint,
    DryRun,
    Out,
    Preset,
    Resume,
    Sets,
    Weights,
    default_checkpoint,
    load_preset,
    parse_weights,
    resumed_preset,
)

app = typer.Typer()

Envs = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", metavar="ENV", help="An environment to train on: math, code or instructions (with "
                 "levels, e.g. code:3-4; a bare domain takes the levels rlvr.envs gives it), DOMAIN=FILE.jsonl, or "
                 "package.module:Class. Repeatable. Default: rlvr.envs (every built-in domain)."),
]


@app.callback(invoke_without_command=True)
def rlvr(
    ctx: typer.Context,
    checkpoint: Checkpoint = None,
    env: Envs = None,
    weight: Weights = None,
    server: Annotated[str | None, typer.Option(metavar="URL", help="Generate on this n3 serve instead of "
                                               "in-process; it reloads the learner's weights after every step.")] = None,
    allow_weak_isolation: Annotated[bool, typer.Option("--allow-weak-isolation", help="Where Linux namespaces are "
                                                       "unavailable, run code as plain processes under rlimits "
                                                       "instead of refusing.")] = False,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Reinforcement learning with verifiable rewards (GRPO family) over several environments (default: the newest
    SFT run on every built-in task) and the held-out accuracy before and after; `score` checks rewards."""
    if ctx.invoked_subcommand is not None:
        return

    # Not stage_preset: the run folder's name holds the environments, which the preset's levels complete, so the
    # fresh preset names the folder whose saved preset --resume then reads.
    cfg = load_preset(preset, overrides)
    names = _apply_env_options(cfg, env, weight, server, allow_weak_isolation)
    run_dir = out or Path("runs") / f"{cfg.name}-rlvr{'-' + '-'.join(names) if env else ''}"
    if resume:
        cfg = resumed_preset(run_dir, preset, overrides)
        _apply_env_options(cfg, env, weight, server, allow_weak_isolation)
    checkpoint = default_checkpoint(checkpoint, resume, ("sft",))
    if dry_run:
        _plan(cfg, checkpoint)
        return
    _train(cfg, run_dir, checkpoint, resume)


def _apply_env_options(cfg, env: list[str] | None, weight: list[str] | None, server: str | None,
                       allow_weak_isolation: bool) -> list[str]:
    """Set --env, --weight, --server and --allow-weak-isolation on cfg.rlvr (on the config itself, not through --set:
    paths and URLs may hold the commas a --set list splits at); the names the blend's environments go by."""
    if env:
        from stages.envs.environments import with_preset_levels

        cfg.rlvr.envs = with_preset_levels(env, cfg.rlvr.envs)
    cfg.rlvr.server = server or cfg.rlvr.server
    cfg.rlvr.allow_weak_isolation = allow_weak_isolation or cfg.rlvr.allow_weak_isolation
    if not (weight or env):
        return list(cfg.rlvr.envs)
    from stages.envs.environments import load_environments, weights_by_name

    envs = load_environments(cfg.rlvr.envs, cfg.rlvr.weights)  # a class names itself
    if weight:
        cfg.rlvr.weights = weights_by_name(envs, parse_weights(weight))
    return list(envs)


def _train(cfg, run_dir: Path, checkpoint: Path | None, resume: bool) -> None:
    from n3cli.progress import training_session
    from n3cli.report import print_rlvr
    from stages.rlvr import rlvr as train

    with training_session(cfg) as (progress, preset_toml):
        result = train(cfg, run_dir, checkpoint, resume=resume, progress=progress, preset_toml=preset_toml)
    if result is not None:
        print_rlvr(result)


def _plan(cfg, checkpoint: Path | None) -> None:
    """What a run would do, without loading weights or sampling: the environments, the batch, the steps."""
    from n3cli.report import console
    from stages.envs.environments import load_environments

    rl = cfg.rlvr
    envs = load_environments(rl.envs, rl.weights)
    console.print(f"start: {checkpoint}")
    console.print(f"environments: {', '.join(envs)} (weights {rl.weights or 'equal'})")
    console.print(f"{rl.train.steps} steps of {rl.prompts_per_step} prompts x {rl.group_size} samples, up to "
                  f"{rl.max_tokens} tokens each; advantage {rl.advantage}, clip [{rl.clip_low}, {rl.clip_high}], "
                  f"kl {rl.kl_coeff}, lr {rl.train.lr}")


@app.command("score")
def score(
    env: Annotated[str, typer.Option("--env", "-e", metavar="ENV", help="The environment: math, code or "
                                     "instructions (the built-in checkers), DOMAIN=FILE.jsonl, or "
                                     "package.module:Class (imported from the current directory).")],
    rows: Annotated[Path, typer.Option("--input", "-i", metavar="FILE.jsonl", help="Rows of the environment's "
                                       "fields plus \"completion\": {\"answer\"} for math, {\"tests\": [\"assert "
                                       "...\"]} for code, {\"instructions\": [{\"id\", \"kwargs\"}]} for "
                                       "instructions; a class gets the row as data.")],
    json_lines: Annotated[bool, typer.Option("--json", help="Print a JSON line per row (row, reward, passed, "
                                             "reason, error, seconds) instead of the table.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Rows scored at once (code rows run programs).")] = 4,
    allow_weak_isolation: Annotated[bool, typer.Option("--allow-weak-isolation", help="Where Linux namespaces are "
                                                       "unavailable, run code as plain processes under rlimits "
                                                       "instead of refusing.")] = False,
) -> None:
    """Score every row's completion in an environment: reward, pass or fail and why, and the mean reward."""
    from rich.console import Console
    from rich.table import Table

    from stages.envs.environments import load_environment
    from stages.envs.sandbox import Runner
    from stages.envs.scoring import score_file, summarize

    runner = Runner(concurrent=workers, allow_weak_isolation=allow_weak_isolation)
    results = score_file(load_environment(env, runner=runner), rows, workers)
    if json_lines:
        for result in results:
            typer.echo(json.dumps(asdict(result)))
        return
    table = Table(show_edge=False)
    for column in ("row", "reward", "result", "reason", "seconds"):
        table.add_column(column, justify="left" if column in ("result", "reason") else "right")
    for r in results:
        table.add_row(str(r.row), f"{r.reward:.3f}", "error" if r.error else "pass" if r.passed else "fail",
                      r.reason, f"{r.seconds:.2f}")
    console = Console(markup=False, highlight=False)  # reasons quote completions: print them as they are
    console.print(table)
    s = summarize(results)
    dropped = " (left out of the mean, as training drops them)" if s.errors else ""
    console.print(f"{s.rows} rows, mean reward {s.mean_reward:.3f}, passed {s.passed}, errors {s.errors}{dropped}",
                  soft_wrap=True)
