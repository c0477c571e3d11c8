"""`n3 sft`: chat fine-tuning in the checkpoint's own chat template, with exact loss masks, document-isolated packing
and reasoning modes (REFERENCE.md sections 4 and 7).

With no arguments: the newest `n3 pretrain` run, on the built-in verifiable tasks, into runs/<preset>-sft/, with the
held-out accuracy before and after. Under torchrun every rank runs this command:
    torchrun --nproc-per-node 8 -m n3cli sft --preset h100 -c runs/h100 --data chats.jsonl
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


def run(
    checkpoint: Checkpoint = None,
    data: ChatData = None,
    weight: Weights = None,
    train_on: Annotated[str | None, typer.Option("--train-on", help="Tokens that take a loss: assistant (every "
                                                 "assistant turn, the default) | final (the last one) | all.")] = None,
    lora: Annotated[int | None, typer.Option("--lora", min=0, metavar="RANK", help="Train LoRA adapters of this rank "
                                             "instead of every weight (sft.lora.rank); merged into each checkpoint.")] = None,
    epochs: Annotated[float | None, typer.Option(min=0, help="Passes over the packed data (sft.epochs); instead of "
                                                 "sft.train.steps.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed rows and count them, instead of "
                                           "stopping at the first.")] = False,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Fine-tune a checkpoint on chat data (default: the newest pretrain run on the built-in tasks) and print the
    held-out accuracy before and after."""
    from model.errors import UserError

    cfg, run_dir = stage_preset(preset, overrides, "sft", out, resume,
                                {"sft.train_on": train_on, "sft.lora.rank": lora, "sft.epochs": epochs})
    sources = None
    if data:
        from stages.chat.sources import parse_chat_sources

        sources = parse_chat_sources(data, parse_weights(weight))
    elif weight:
        raise UserError("--weight names --data sources; give --data NAME=PATH")
    checkpoint = default_checkpoint(checkpoint, resume, ("pretrain",), required=not dry_run)
    if dry_run:
        _plan(cfg, checkpoint, sources, skip_bad)
        return
    _train(cfg, run_dir, checkpoint, sources, resume, skip_bad)


def _train(cfg, run_dir: Path, checkpoint: Path | None, sources, resume: bool, skip_bad: bool) -> None:
    from n3cli.progress import training_session
    from n3cli.report import print_sft
    from stages.sft import sft

    with training_session(cfg) as (progress, preset_toml):
        result = sft(cfg, run_dir, checkpoint, sources, resume=resume, skip_bad=skip_bad, progress=progress,
                     preset_toml=preset_toml)
    if result is not None:
        print_sft(result)


def _plan(cfg, checkpoint: Path | None, sources, skip_bad: bool) -> None:
    """The model's plan under [sft.train], and the data as it would be packed, without loading any weights."""
    import dataclasses

    from model.checkpoint import config_from_hf, read_config, resolve_checkpoint
    from n3cli.report import console, print_chat_data, print_plan
    from stages.chat.data import build_chat_data
    from stages.envs.suite import parse_suite
    from stages.plan import plan_run
    from stages.runtime.settings import chat_tokenizer
    from stages.sft import chat_options, total_steps

    if checkpoint is None:
        console.print(f"no checkpoint given and no pretrain run under runs/: the plan of the {cfg.shape} shape")
        print_plan(plan_run(dataclasses.replace(cfg, train=cfg.sft.train)))
        return
    path = resolve_checkpoint(checkpoint)
    model = config_from_hf(read_config(path))
    print_plan(plan_run(dataclasses.replace(cfg, model=model, train=cfg.sft.train)))
    if cfg.sft.lora.rank:
        from model.hybrid import build
        from stages.runtime.lora import adapter_parameters

        count = adapter_parameters(build(model, device="meta"), cfg.sft.lora)
        console.print(f"LoRA rank {cfg.sft.lora.rank} ({', '.join(cfg.sft.lora.targets)}): {count:,} parameters train, "
                      "the rest is frozen")
    data = build_chat_data(chat_tokenizer(path, "n3 sft"), chat_options(cfg), sources, parse_suite(cfg.sft.tasks), skip_bad)
    steps = total_steps(cfg, len(data.train))
    print_chat_data(data, steps, cfg.sft.train.global_batch_size)
