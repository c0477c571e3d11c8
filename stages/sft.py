"""`n3 sft`: chat fine-tuning of a checkpoint (n3's or a Hugging Face NemotronH one) in its own chat template
(REFERENCE.md sections 4 and 7).

The data: conversations (chat files, or the built-in verifiable tasks) in the reasoning modes of the mix, rendered by
the checkpoint's template with loss masks derived from it (stages.chat.masks), packed best-fit into rows whose
conversations cannot see each other (seq_idx). The training: the shared loop (runtime.loop) on the next-token loss of
the trained tokens plus the MTP losses, with SFT's optimisation table [sft.train], full fine-tuning or LoRA (merged
into every checkpoint written). The figure it moves: held-out accuracy on the built-in tasks, greedy, reasoning on and
off, measured on the starting checkpoint and on the final one (stages.envs.suite).

The run folder is a training run (runtime/checkpointing.py) whose trainer.json says stage "sft", plus `sft.json`
(the data, the training, the accuracy before and after) and `tasks-before.json` / `tasks-after.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config
from model.errors import UserError
from model.hybrid import build
from presets import check_train
from presets.schema import RunConfig
from stages.chat.data import ChatData, ChatDataOptions, build_chat_data
from stages.chat.packing import PackedChatBatches
from stages.chat.reasoning import ReasoningMix
from stages.chat.sources import ChatSource
from stages.envs.suite import SuiteAccuracy, accuracy_before, checkpoint_accuracy, parse_suite
from stages.runtime import distributed
from stages.runtime.checkpointing import latest_resumable, resume_loop, start_run_folder, starting_point
from stages.runtime.files import write_json
from stages.runtime.loop import LoopResult, TrainingJob, run_loop, validation
from stages.runtime.lora import apply_lora, target_modules
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import chat_tokenizer, configure_kernels

STAGE = "sft"


@dataclass
class SFTResult:
    run: Path
    start: Path
    """The checkpoint fine-tuned."""
    data: ChatData
    total_steps: int
    rows_per_step: int
    start_step: int
    loop: LoopResult | None
    """None when the run was complete already."""
    checkpoint: Path
    before: SuiteAccuracy | None
    after: SuiteAccuracy | None

    def summary(self) -> dict:
        loop = self.loop
        return {
            "run": str(self.run), "start": str(self.start), "checkpoint": str(self.checkpoint),
            "steps": self.total_steps, "data": self.data.summary(),
            "training": None if loop is None else {"seconds": loop.seconds, "tokens": loop.tokens,
                                                   "final_loss": loop.last.get("loss"), "val_loss": loop.val_loss},
            "tasks_before": self.before.summary() if self.before else None,
            "tasks_after": self.after.summary() if self.after else None,
        }


def sft(
    cfg: RunConfig, run: Path, checkpoint: Path | None, data: list[ChatSource] | None = None, resume: bool = False,
    skip_bad: bool = False, progress: Progress | None = None, preset_toml: str | None = None,
) -> SFTResult | None:
    """Fine-tune `checkpoint` (a checkpoint or run folder; on --resume the run's own) on `data` (None: the built-in
    tasks, or on --resume the chat files the run started with) into the run folder. Collective under torchrun;
    returns the result on rank 0, None elsewhere."""
    progress = progress or Quiet()
    train = cfg.sft.train
    world = distributed.setup(cfg)
    distributed.check_layout(cfg, world, train)
    configure_kernels(cfg)
    start, path, trainer = starting_point(run, checkpoint, resume, STAGE, "an SFT run")
    if trainer is not None and data is None and trainer.get("sources"):  # a resumed run keeps its chat files
        data = [ChatSource(name, Path(where), weight) for name, where, weight in trainer["sources"]]
    source = path or start
    tokenizer = chat_tokenizer(source, "n3 sft")
    model_cfg = config_from_hf(read_config(source))
    check_train(cfg, "sft.train", model_cfg)
    if cfg.sft.lora.rank:
        target_modules(build(model_cfg, device="meta"), cfg.sft.lora.targets)  # a bad target fails before any work
    suite = parse_suite(cfg.sft.tasks)
    chat = build_chat_data(tokenizer, chat_options(cfg), data, suite, skip_bad, progress)
    if trainer is not None and trainer.get("data_fingerprint") != chat.fingerprint:
        raise UserError(f"cannot resume {run}: its training data has changed since the run started "
                        "(resume it without --data, or with the files it started with, unchanged)")
    steps = total_steps(cfg, len(chat.train))
    if not resume and world.is_main:
        start_run_folder(Path(run), cfg.name, preset_toml)

    before = None
    if world.is_main and data is None:
        before = accuracy_before(cfg, Path(run), start, suite, resume, cfg.sft.eval_problems,
                                 cfg.sft.eval_max_tokens, train.seed, progress, "held-out accuracy before SFT")
    world.barrier()

    torch.manual_seed(train.seed)
    model = from_pretrained(source, dtype=torch.float32, device=world.device)
    depths = train.mtp_depths if model.mtp is not None else 0
    if train.mtp_depths and model.mtp is None:
        progress.note(f"{source} has no MTP head: the main head trains alone")
    if cfg.sft.lora.rank:
        progress.note(apply_lora(model, cfg.sft.lora))
    objective = distributed.prepare_model(CausalLMObjective(model, depths), cfg, world, progress.note, train)
    optimizer = build_optimizer(objective, train)
    batches = PackedChatBatches(chat.train, train.micro_batch_size, train.global_batch_size, world.rank, world.size,
                                train.seed)
    start_step, monitor_state = resume_loop(path, objective, optimizer, batches, world, progress.note)

    result = None
    if start_step < steps:
        val = chat.val.micro_batches(train.micro_batch_size)[: max(1, train.eval_sequences // train.micro_batch_size)] \
            if chat.val is not None else []
        job = TrainingJob(
            train=train, compute=cfg.precision.compute, world=world, objective=objective, optimizer=optimizer,
            batches=batches, total_steps=steps, run=Path(run), tokenizer=tokenizer, progress=progress,
            flops_per_token=flops_per_token(model_cfg, train.seq_len, depths),
            peak_flops=peak_flops(world.device, train.peak_tflops),
            evaluate=validation(objective, val, cfg.precision.compute, world),
            trainer_state={"stage": STAGE, "start": str(start), "preset": cfg.name, "total_steps": steps,
                           "sources": [[s.name, str(s.path), s.weight] for s in data] if data else None,
                           "data_fingerprint": chat.fingerprint},
        )
        result = run_loop(job, start_step, monitor_state)
    world.barrier()
    if not world.is_main:
        return None
    final = latest_resumable(run)
    after = None
    if data is None:
        after = evaluate(cfg, final, suite, progress, "held-out accuracy after SFT")
        write_json(Path(run) / "tasks-after.json", after.summary())
    out = SFTResult(Path(run), start, chat, steps, train.global_batch_size, start_step, result, final, before, after)
    write_json(Path(run) / "sft.json", out.summary())
    return out


def chat_options(cfg: RunConfig) -> ChatDataOptions:
    """How [sft] makes its training rows."""
    sft = cfg.sft
    return ChatDataOptions(
        seq_len=sft.train.seq_len, seed=sft.train.seed, train_on=sft.train_on, reasoning_loss=sft.reasoning_loss,
        reasoning=ReasoningMix(sft.reasoning_off, sft.reasoning_truncated), problems=sft.problems,
        val_fraction=sft.val_fraction,
    )


def total_steps(cfg: RunConfig, rows: int) -> int:
    """sft.epochs passes over the rows when set; otherwise the steps (or the token budget) of [sft.train]."""
    train = cfg.sft.train
    if cfg.sft.epochs:
        return max(1, math.ceil(cfg.sft.epochs * rows / train.global_batch_size))
    if train.tokens:
        return math.ceil(train.tokens / (train.global_batch_size * train.seq_len))
    return train.steps


def evaluate(cfg: RunConfig, checkpoint: Path, suite: dict, progress: Progress, title: str) -> SuiteAccuracy:
    """Held-out accuracy of a checkpoint on the suite: sft.eval_problems per domain, greedy, reasoning on and off."""
    return checkpoint_accuracy(cfg, checkpoint, suite, cfg.sft.eval_problems, cfg.sft.eval_max_tokens,
                               cfg.sft.train.seed, progress, title)
