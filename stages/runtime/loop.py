"""The training loop every training stage runs: micro-batches with gradient accumulation, exact global-batch loss
normalisation, clipping, AdamW with the WSD schedule, the expert-bias update, metrics, evaluation, checkpoints.

A stage supplies a `TrainingJob`: its optimisation settings (a TrainConfig: pretraining's [train], a stage's own
such table), the objective (a module whose forward returns the loss and its statistics, see losses.CausalLMObjective)
prepared by distributed.prepare_model, the optimizer, and a source of batches with `next_step()` (this rank's
micro-batches, batches.MicroBatch), `phase()`, `state_dict()` and `load_state_dict()`; under context parallelism
(`context`, see stages.runtime.context) the source gives this rank's group whole rows and the loop slices them; under
pipeline parallelism (`pipeline`, see stages.runtime.pipeline) it gives this rank's pipeline its rows, the objective
is this rank's stage, and the pipeline's schedule runs the micro-batches.

Loss normalisation: each head's summed token losses are divided by that head's valid-label count over the whole global
batch (all micro-batches, all ranks), so one process with accumulation and N processes compute the same loss and
gradients. Data-parallel wrappers average gradients over ranks, hence the factor `world` in the weights. Under context
parallelism each rank sums the losses of its slices, and the counts cover every slice, so the same holds. Under
pipeline parallelism the P stages of a pipeline see the same rows (the counts are divided by P) and the wrappers
average over the world / P ranks of a stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kernels.cross_entropy import IGNORE
from model.tokenizer import Tokenizer
from presets.schema import TrainConfig
from stages.runtime import distributed
from stages.runtime.checkpointing import save_checkpoint
from stages.runtime.context import ContextLayout
from stages.runtime.distributed import World
from stages.runtime.expert_parallel import step_metrics as expert_metrics
from stages.runtime.losses import head_token_counts, update_expert_bias
from stages.runtime.metrics import MetricsLog, Monitor, max_violation
from stages.runtime.optim import set_lr, wsd_lr
from stages.runtime.pipeline import PipelineRunner
from stages.runtime.progress import Progress


@dataclass
class TrainingJob:
    train: TrainConfig
    compute: str
    """The matmul precision (precision.compute): what the forwards autocast to."""
    world: World
    objective: nn.Module
    """A losses.CausalLMObjective (or one with its forward contract), prepared by distributed.prepare_model."""
    optimizer: torch.optim.Optimizer
    batches: object
    total_steps: int
    run: Path
    tokenizer: Tokenizer
    progress: Progress
    flops_per_token: float
    peak_flops: float | None
    evaluate: Callable[[], float | None] | None = None
    """Validation loss of the current weights (collective), or None when there is nothing to validate on."""
    trainer_state: dict = field(default_factory=dict)
    """Facts saved in every checkpoint's trainer.json besides the loop's own (e.g. the corpus fingerprint)."""
    context: ContextLayout | None = None
    """Context parallelism (ContextLayout.setup), or None: whole rows on every rank."""
    pipeline: PipelineRunner | None = None
    """Pipeline parallelism (the objective is this rank's stage, see stages.runtime.pipeline), or None."""


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float
    last: dict
    """The last step's metrics record."""
    val_loss: float | None
    checkpoint: Path | None
    warnings: list[str]


def run_loop(job: TrainingJob, start_step: int = 0, monitor_state: dict | None = None) -> LoopResult:
    """Train from optimizer step `start_step` to job.total_steps; evaluate and checkpoint at the preset's intervals
    and at the end. Every rank calls it."""
    train, world = job.train, job.world
    objective = distributed.unwrap(job.objective)
    moes, moe_names = objective.main_moes + objective.mtp_moes, objective.moe_names
    head_scales = _head_scales(job)
    tokens_per_step = train.global_batch_size * train.seq_len
    monitor = Monitor(train.maxvio_warn, train.residual_jump_warn, settle_steps=max(train.warmup_steps, 50))
    if monitor_state:
        monitor.load_state_dict(monitor_state)
    log = MetricsLog(job.run / "metrics.jsonl", resume_step=start_step or None) if world.is_main else None

    job.progress.start("training", total=job.total_steps, completed=start_step)
    record: dict = {}
    val_loss, checkpoint, warnings, started = None, None, [], time.perf_counter()
    job.objective.train()
    for step in range(start_step, job.total_steps):
        tick = time.perf_counter()
        lr, head_losses, aux, load, rms, grad_norm = optimizer_step(job, step)
        seconds = time.perf_counter() - tick
        done, throughput = step + 1, tokens_per_step / seconds
        maxvio = max_violation(load).tolist() if moes else []
        record = {
            "step": done,
            "loss": sum(s * loss for s, loss in zip(head_scales, head_losses)) + train.aux_loss_coeff * aux,
            "ce": head_losses[0],
            "mtp": head_losses[1:],
            "aux": aux,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": done * tokens_per_step,
            "tokens_per_s": throughput,
            "mfu": throughput * job.flops_per_token / (job.peak_flops * world.size) if job.peak_flops else None,
            "phase": job.batches.phase(),
            "maxvio": dict(zip(moe_names, maxvio)),
            "residual_rms": rms.tolist(),
        } | expert_metrics(objective, world, seconds) | _pipeline_metrics(job)
        step_warnings = monitor.check(done, maxvio, record["residual_rms"], moe_names)
        if done % train.eval_interval == 0 or done == job.total_steps:
            val_loss = record["val_loss"] = job.evaluate() if job.evaluate else None
        if step_warnings:
            record["warnings"] = step_warnings
            warnings += step_warnings
        if log is not None:
            log.write(record)
            for warning in step_warnings:
                job.progress.note(f"warning: {warning}")
        job.progress.advance(1, loss=record["loss"], lr=lr, tokens_per_s=throughput, mfu=record["mfu"])
        if done % train.checkpoint_interval == 0 or done == job.total_steps:
            trainer = job.trainer_state | {"data": job.batches.state_dict(), "monitor": monitor.state_dict()}
            checkpoint = save_checkpoint(job.run, done, job.objective, job.optimizer, trainer, job.tokenizer, world,
                                         keep=train.keep_checkpoints, pipeline=_layout(job))
    steps = job.total_steps - start_step
    return LoopResult(steps, steps * tokens_per_step, time.perf_counter() - started, record, val_loss, checkpoint,
                      warnings)


def optimizer_step(job: TrainingJob, step: int) -> tuple[float, list[float], float, torch.Tensor, torch.Tensor, float]:
    """Optimizer step number `step` (0-based) of the job, on every rank: the scheduled learning rate, forward and
    backward over this rank's micro-batches, clipping, AdamW, the expert-bias update. Returns the learning rate, each
    head's loss, the aux loss, the expert load per MoE layer, the residual RMS per layer and the gradient norm."""
    train = job.train
    lr = wsd_lr(step, job.total_steps, train)
    set_lr(job.optimizer, lr)
    head_losses, aux, load, rms = _accumulate_gradients(job, _head_scales(job))
    layout = _layout(job)
    grad_norm = apply_gradients(job.objective, job.optimizer, train, load, None if layout is None else layout.group)
    return lr, head_losses, aux, load, rms, grad_norm


def apply_gradients(objective: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, load: torch.Tensor,
                    stages=None) -> float:
    """The end of every optimizer step, whatever the objective: clip the accumulated gradients, step AdamW, clear
    the gradients, move the expert biases by the step's load (per MoE layer, as the objective lists them; None for
    another pipeline stage's). `stages`: the pipeline's process group, whose ranks hold the other stages' gradients
    (the norm covers them all). Returns the gradient norm before clipping."""
    params = [p for p in objective.parameters() if p.requires_grad]
    grad_norm = distributed.clip_gradients(params, train.grad_clip or math.inf, stages)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    unwrapped = distributed.unwrap(objective)
    for moe, layer_load in zip(unwrapped.main_moes + unwrapped.mtp_moes, load):
        if moe is not None:
            update_expert_bias(moe, layer_load, train.bias_update_rate)
    return float(distributed.full_tensor(grad_norm))


def _layout(job: TrainingJob):
    """The job's pipeline layout, or None."""
    return None if job.pipeline is None else job.pipeline.layout


def _pipeline_metrics(job: TrainingJob) -> dict:
    """The step's pipeline bubble share (collective); empty without pipeline parallelism."""
    return {} if job.pipeline is None else {"pipeline_bubble_share": job.pipeline.take_bubble_share()}


def _head_scales(job: TrainingJob) -> list[float]:
    """The weight of each head's mean loss, as the objective decides it."""
    return distributed.unwrap(job.objective).head_scales(job.train)


def _accumulate_gradients(job: TrainingJob, head_scales: list[float]):
    """Forward and backward over this rank's micro-batches of the next step. Returns, over the global batch: each
    head's mean loss, the mean aux loss, the expert load per MoE layer and the mean residual RMS per layer."""
    layout = job.context or ContextLayout.single(job.world)
    micro_batches = [layout.slice(mb) for mb in job.batches.next_step()]
    with layout.active():
        return _forward_backward(job, head_scales, micro_batches)


def _forward_backward(job: TrainingJob, head_scales: list[float], micro_batches: list):
    """_accumulate_gradients over the given micro-batches (this rank's slices under context parallelism)."""
    train, world = job.train, job.world
    depths = len(head_scales) - 1
    stages = 1 if job.pipeline is None else job.pipeline.layout.size  # the ranks that see the same rows
    counts = torch.stack([head_token_counts(mb.labels, depths, mb.seq_idx) for mb in micro_batches]).sum(0)
    counts = (world.all_reduce(counts.to(world.device)) / stages).clamp(min=1).tolist()
    # Wrappers average gradients over the ranks holding the same weights: multiply by their number to keep
    # sum(loss) / global count.
    weights = [world.size // stages * scale / n for scale, n in zip(head_scales, counts)]
    weights.append(train.aux_loss_coeff / len(micro_batches))
    if job.pipeline is not None:
        with distributed.autocast(job.compute, world):
            sums, load, rms = job.pipeline.step(micro_batches, weights)
    else:
        sums, load, rms = _each_micro_batch(job, micro_batches, weights)
    distributed.reduce_output_gradients(job.objective, world)
    stats = world.all_reduce(torch.cat([sums, load.flatten(), rms]))
    sums, load, rms = stats[: len(sums)], stats[len(sums) : len(sums) + load.numel()].view_as(load), stats[-len(rms) :]
    micro_total = len(micro_batches) * world.size // stages
    head_losses = [total / n for total, n in zip(sums[:-1].tolist(), counts)]
    return head_losses, sums[-1].item() / micro_total, load, rms / micro_total


def _each_micro_batch(job: TrainingJob, micro_batches: list, weights: list[float]):
    """Forward and backward of each micro-batch in turn, gradients synchronised after the last; returns this rank's
    summed statistics: head sums and aux, expert load, residual RMS."""
    world = job.world
    sums, load, rms = 0, 0, 0
    for i, mb in enumerate(micro_batches):
        with distributed.gradient_sync(job.objective, sync=i == len(micro_batches) - 1):
            with distributed.autocast(job.compute, world):
                out = job.objective(mb.input_ids.to(world.device), mb.labels.to(world.device), weights,
                                    seq_idx=_on(mb.seq_idx, world))
            out["loss"].backward()
        sums = sums + torch.cat([out["head_sums"], out["aux"][None]])
        load, rms = load + out["expert_load"], rms + out["residual_rms"]
    return sums, load, rms


def _on(tensor: torch.Tensor | None, world: World) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(world.device)


def validation(
    objective: nn.Module, batches: list, compute: str, world: World, context: ContextLayout | None = None,
    pipeline: PipelineRunner | None = None,
) -> Callable[[], float | None]:
    """A function returning the mean next-token loss over `batches` (micro-batches of the validation set) with the
    matmuls in `compute` precision. Every rank runs the same number of forwards (FSDP gathers weights in each); a rank
    short of batches runs a masked one. Under context parallelism (`context`) the ranks of a group evaluate the
    slices of the same batches; under pipeline parallelism (`pipeline`) the stages of a pipeline run them in turn."""
    layout = context or ContextLayout.single(world)
    readers = layout if pipeline is None else pipeline.layout  # who reads which batches
    per_rank = math.ceil(len(batches) / readers.data_size)

    @torch.no_grad()
    def evaluate() -> float | None:
        if not batches:
            return None
        totals = torch.zeros(2, device=world.device)
        objective.eval()
        for i in range(per_rank):
            j = i * readers.data_size + readers.data_rank
            batch = layout.slice(batches[min(j, len(batches) - 1)])
            labels = batch.labels if j < len(batches) else torch.full_like(batch.labels, IGNORE)
            with layout.active(), distributed.autocast(compute, world):
                if pipeline is not None:
                    totals += pipeline.evaluate(batch, labels)
                    continue
                out = objective(batch.input_ids.to(world.device), labels.to(world.device),
                                seq_idx=_on(batch.seq_idx, world))
            totals += torch.stack([out["head_sums"][0], (labels != IGNORE).sum().to(totals)])
        objective.train()
        world.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    return evaluate
