"""`n3 mtp-boost`: the MTP head distilled from its frozen model on the model's own replies, so that self-speculative
decoding accepts longer drafts (REFERENCE.md section 4).

    n3 mtp-boost                                     the newest post-trained run (mopd, rlvr or sft)
    n3 mtp-boost -c runs/cpu-mopd --depths 7 --temperature 2 --inputs recursion
    n3 mtp-boost -c nemotron-3-nano --init --data chats.jsonl     a checkpoint without an MTP head: build one
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from n3cli.options import (
    DEFAULT_PRESET,
    ChatData,
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

POST_TRAINED = ("sft", "rlvr", "mopd")
"""The stages whose newest run `n3 mtp-boost` starts from by default."""


def run(
    checkpoint: Checkpoint = None,
    init: Annotated[bool, typer.Option("--init", help="Build an MTP head (mtp_boost.init_pattern, *E by default) for "
                                       "a checkpoint without one, then train it.")] = False,
    depths: Annotated[int | None, typer.Option("--depths", "-N", help="N, the MTP depths distilled, 1 to 7 "
                                               "(mtp_boost.train.mtp_depths).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-T", help="T, the distillation "
                                                      "temperature, above 0 and at most 10 (mtp_boost.temperature)."
                                                      )] = None,
    inputs: Annotated[str | None, typer.Option(help="Depth k's input: mixing (the backbone's or an earlier depth's "
                                               "state, drawn per token) | recursion (depth k - 1's output).")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="ENV", help="Prompts from an environment, as "
                   "`n3 rlvr --env`. Repeatable. Default: mtp_boost.envs.")] = None,
    data: ChatData = None,
    weight: Weights = None,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Train the MTP head alone on the model's own replies (default: the newest post-trained run) and print the
    acceptance length per draft length, greedy and at temperature 1, and the decode speedup, before and after."""
    from model.errors import UserError
    from stages.envs.environments import load_environments, weights_by_name, with_preset_levels

    cfg, run_dir = stage_preset(preset, overrides, "mtp-boost", out, resume, {
        "mtp_boost.train.mtp_depths": depths, "mtp_boost.temperature": temperature, "mtp_boost.inputs": inputs,
    })
    mb = cfg.mtp_boost
    sources = None
    if data:
        from stages.chat.sources import parse_chat_sources

        if env:
            raise UserError("give --env or --data, not both: the prompts come from one or the other")
        sources = parse_chat_sources(data, parse_weights(weight))
    else:
        mb.envs = with_preset_levels(env, mb.envs) if env else mb.envs
        if weight:
            mb.weights = weights_by_name(load_environments(mb.envs, mb.weights), parse_weights(weight))
    checkpoint = default_checkpoint(checkpoint, resume, POST_TRAINED)
    if dry_run:
        _plan(cfg, checkpoint, init, sources)
        return
    _train(cfg, run_dir, checkpoint, init, sources, resume)


def _train(cfg, run_dir: Path, checkpoint: Path | None, init: bool, sources, resume: bool) -> None:
    from n3cli.progress import training_session
    from n3cli.report import print_mtp_boost
    from stages.mtp_boost import mtp_boost

    with training_session(cfg) as (progress, preset_toml):
        result = mtp_boost(cfg, run_dir, checkpoint, init, sources, resume=resume, progress=progress,
                           preset_toml=preset_toml)
    if result is not None:
        print_mtp_boost(result)


def _plan(cfg, checkpoint: Path | None, init: bool, sources) -> None:
    from n3cli.report import console

    mb = cfg.mtp_boost
    prompts = ", ".join(str(s.path) for s in sources) if sources else ", ".join(mb.envs)
    console.print(f"checkpoint: {checkpoint}" + (f" (an MTP head of pattern {mb.init_pattern!r} is built first)"
                                                 if init else ""))
    console.print(f"replies at temperature 1 to {mb.prompts} prompts of {prompts}, up to {mb.max_tokens} tokens; "
                  f"{mb.eval_prompts} held out")
    console.print(f"{mb.train.steps} steps of {mb.train.global_batch_size} rows x {mb.train.seq_len}: "
                  f"{mb.train.mtp_depths} depths at T = {mb.temperature} ({mb.inputs}), lr {mb.train.lr}")
