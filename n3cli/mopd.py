"""`n3 mopd`: multi-teacher on-policy distillation (REFERENCE.md section 4).

    n3 mopd                                          the newest SFT run, taught by the newest `n3 rlvr --env D` runs
    n3 mopd --teacher math=runs/cpu-rlvr-math --teacher code=http://gpu-7:8000 --env math --env code
    n3 mopd --weight math=2 --warmup-steps 10 --cycles 2 --max-staleness 4
"""

from __future__ import annotations

import json
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
    parse_weights,
    stage_preset,
)

BUILT_IN = ("math", "code", "instructions")


def run(
    checkpoint: Checkpoint = None,
    teacher: Annotated[list[str] | None, typer.Option("--teacher", "-t", metavar="DOMAIN=SOURCE", help="The teacher "
                       "of a domain: a checkpoint or run folder (scored in this process) or the URL of an "
                       "OpenAI-compatible server that returns prompt log-probs (n3 serve, vLLM). Repeatable. "
                       "Default: the newest `n3 rlvr --env DOMAIN` run of each domain.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="ENV", help="A domain's prompts: math, code "
                   "or instructions (with levels, e.g. code:3-4; a bare domain takes mopd.envs' levels), "
                   "DOMAIN=FILE.jsonl, or package.module:Class. "
                   "Repeatable. Default: mopd.envs (every built-in domain).")] = None,
    weight: Weights = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help="SFT steps on the teachers' replies before each "
                            "cycle's distillation (default: mopd.warmup.steps; 0 skips the warmup).")] = None,
    cycles: Annotated[int | None, typer.Option(min=1, help="Warmup and distillation, repeated (default: "
                      "mopd.cycles).")] = None,
    orm_weight: Annotated[float | None, typer.Option(help="Add this times the environment's reward (less the "
                          "domain's mean) to every token's advantage (default: mopd.orm_weight).")] = None,
    max_staleness: Annotated[int | None, typer.Option(help="Policy versions a rollout may lag the learner; 0 is "
                             "synchronous (default: mopd.max_staleness).")] = None,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Multi-teacher on-policy distillation: each domain's teacher scores the student's own samples token by token
    (default: the newest SFT run, taught by the newest single-domain RLVR runs); held-out accuracy before and after
    against each teacher's."""
    from model.errors import UserError

    cfg, run_dir = stage_preset(preset, overrides, "mopd", out, resume)
    md = cfg.mopd
    from stages.envs.environments import load_environments, weights_by_name, with_preset_levels

    md.envs = with_preset_levels(env, md.envs) if env else md.envs
    if warmup_steps is not None:
        md.warmup.steps = warmup_steps
    if cycles is not None:
        md.cycles = cycles
    if orm_weight is not None:
        md.orm_weight = orm_weight
    if max_staleness is not None:
        if max_staleness < 0:
            raise UserError(f"--max-staleness must be at least 0, got {max_staleness}")
        md.max_staleness = max_staleness
    envs = load_environments(md.envs, md.weights)
    if weight:
        md.weights = weights_by_name(envs, parse_weights(weight))
    teachers = _teachers(teacher or md.teachers, list(envs), resume)
    checkpoint = default_checkpoint(checkpoint, resume, ("sft",), role="the student")
    if dry_run:
        _plan(cfg, checkpoint, teachers)
        return
    _train(cfg, run_dir, checkpoint, teachers, resume)


def _teachers(specs: list[str], domains: list[str], resume: bool) -> dict[str, str]:
    """DOMAIN=SOURCE options as {domain: source}; a domain without one takes the newest `n3 rlvr --env DOMAIN` run
    (a built-in domain), or is an error that says how to make it."""
    from model.errors import UserError
    from stages.runtime.checkpointing import newest_run

    teachers: dict[str, str] = {}
    for spec in specs:
        domain, eq, source = spec.partition("=")
        if not eq or not domain or not source:
            raise UserError(f"--teacher {spec!r}: give DOMAIN=CHECKPOINT_OR_URL, e.g. math=runs/cpu-rlvr-math")
        if domain in teachers:
            raise UserError(f"two teachers for {domain!r}: give one --teacher per domain")
        teachers[domain] = source
    if resume:
        return teachers
    for domain in domains:
        if domain in teachers:
            continue
        found = newest_run(Path("runs"), "rlvr", lambda run, d=domain: _trained_only(run, d))
        if found is None:
            hint = f"`n3 rlvr --env {domain}` makes one" if domain in BUILT_IN else "give --teacher"
            raise UserError(f"no teacher for {domain}: no run under runs/ is a finished `n3 rlvr --env {domain}` run "
                            f"({hint}), or give --teacher {domain}=CHECKPOINT_OR_URL")
        teachers[domain] = str(found)
    return teachers


def _trained_only(run: Path, domain: str) -> bool:
    """The RLVR run finished (rlvr.json) training on `domain` alone."""
    summary = run / "rlvr.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("environments") == [domain]
    except json.JSONDecodeError:
        return False


def _train(cfg, run_dir: Path, checkpoint: Path | None, teachers: dict[str, str], resume: bool) -> None:
    from n3cli.progress import training_session
    from n3cli.report import print_mopd
    from stages.mopd import mopd

    with training_session(cfg) as (progress, preset_toml):
        result = mopd(cfg, run_dir, checkpoint, teachers, resume=resume, progress=progress, preset_toml=preset_toml)
    if result is not None:
        print_mopd(result)


def _plan(cfg, checkpoint: Path | None, teachers: dict[str, str]) -> None:
    from n3cli.report import console

    md = cfg.mopd
    console.print(f"student: {checkpoint}")
    for domain, source in teachers.items():
        console.print(f"{domain} teacher: {source}")
    console.print(f"{md.cycles} cycle(s) of {md.warmup.steps} warmup SFT steps on the teachers' replies and "
                  f"{md.train.steps} distillation steps of {md.prompts_per_step} prompts x {md.group_size}, up to "
                  f"{md.max_tokens} tokens; staleness <= {md.max_staleness} "
                  f"({'asynchronous' if md.asynchronous else 'synchronous'}), lr {md.train.lr}")
