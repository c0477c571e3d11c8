"""`n3 extend`: the long-context phase that ends pretraining (REFERENCE.md section 2).

    n3 extend                                        the newest pretrain run, to extend.train.seq_len (cpu: 4096)
    n3 extend -c runs/cpu --seq-len 4096 --data repository --data mydocs=docs/ --no-masking
    torchrun --nproc-per-node 8 -m n3cli extend --preset h100 -c runs/h100 --set parallel.context=2
"""

from __future__ import annotations

import dataclasses
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
    default_checkpoint,
    stage_preset,
)


def run(
    checkpoint: Checkpoint = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=2, help="The new context: the long rows' length "
                                                "(extend.train.seq_len).")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", metavar="SOURCE", help="A source of long rows: "
                    "repository, retrieval, corpus (built in) or NAME=PATH (text files, a folder or jsonl, as `n3 "
                    "data`). Repeatable. Default: extend.data.")] = None,
    masking: Annotated[bool | None, typer.Option("--masking/--no-masking", help="Keep the documents of a row apart "
                                                 "(extend.document_masking).")] = None,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Continue pretraining a checkpoint on long rows (default: the newest pretrain run) and print the loss by
    position, RULER and the short-context loss, before and after."""
    from presets import check_extend

    cfg, run_dir = stage_preset(preset, overrides, "extend", out, resume,
                                {"extend.train.seq_len": seq_len, "extend.document_masking": masking})
    if data:
        cfg = dataclasses.replace(cfg, extend=dataclasses.replace(cfg.extend, data=list(data), weights=[]))
        check_extend(cfg)
    if dry_run:
        _plan(cfg, checkpoint)
        return
    _train(cfg, run_dir, default_checkpoint(checkpoint, resume, ("pretrain",)), resume)


def _train(cfg, run_dir: Path, checkpoint: Path | None, resume: bool) -> None:
    from model.checkpoint import config_from_hf, read_config, resolve_checkpoint
    from n3cli.pretrain import pretraining_corpus
    from n3cli.progress import training_session
    from n3cli.report import print_extend
    from stages.extend import extend
    from stages.runtime.checkpointing import latest_resumable, read_trainer_state

    start = Path(read_trainer_state(latest_resumable(run_dir))["start"]) if resume else resolve_checkpoint(checkpoint)
    with training_session(cfg) as (progress, preset_toml):
        corpus, prepare_corpus = pretraining_corpus(cfg, config_from_hf(read_config(start)).vocab_size, progress)
        result = extend(cfg, run_dir, checkpoint, corpus, resume=resume, progress=progress,
                        prepare_corpus=prepare_corpus, preset_toml=preset_toml)
    if result is not None:
        print_extend(result)


def _plan(cfg, checkpoint: Path | None) -> None:
    """The plan at the long length under the phase's layout (extend.context_parallel), without weights: of the
    checkpoint's model when one is given, else of the preset's shape."""
    from model.checkpoint import config_from_hf, read_config, resolve_checkpoint
    from n3cli.report import print_plan
    from stages.extend import phase_config
    from stages.plan import plan_run

    model = cfg.model if checkpoint is None else config_from_hf(read_config(resolve_checkpoint(checkpoint)))
    print_plan(plan_run(phase_config(cfg, model)))
