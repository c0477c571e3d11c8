"""`n3 pretrain`: train a model from scratch on a prepared corpus (REFERENCE.md section 2), resumable, single-process
or under torchrun, data-parallel, context-parallel (parallel.context: groups of ranks share each sequence, see
runtime/context.py), expert-parallel (parallel.expert, runtime/expert_parallel.py) and pipeline-parallel
(parallel.pipeline: each rank holds a stage of the sublayers, runtime/pipeline.py).

The run folder (made by the CLI, which also saves the resolved preset there) receives metrics.jsonl and
checkpoints/step-<8 digits>/ (see runtime/checkpointing.py). The run ends with a validation loss, compared with the
corpus' unigram entropy (what a model that ignores context scores), and a sample continuation from the final
checkpoint loaded back from disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import from_pretrained
from model.engine import Engine, EngineConfig, SamplingParams
from model.errors import UserError
from model.hybrid import build
from model.tokenizer import Tokenizer
from presets.schema import RunConfig
from stages.runtime import distributed
from stages.runtime.batches import PackedBatches, validation_batches
from stages.runtime.checkpointing import latest_resumable, read_trainer_state, resume_loop, start_run_folder
from stages.runtime.context import ContextLayout
from stages.runtime.corpus import Manifest
from stages.runtime.files import write_json
from stages.runtime.loop import LoopResult, TrainingJob, run_loop, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer
from stages.runtime.pipeline import PipelineLayout, PipelineRunner
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import configure_kernels

PROMPT_TOKENS = 24
SAMPLE_TOKENS = 48


@dataclass
class PretrainResult:
    run: Path
    total_steps: int
    start_step: int
    loop: LoopResult | None
    """None when the run was already complete."""
    unigram_entropy: float
    checkpoint: Path
    prompt: str
    sample: str
    parameters: int
    val_loss: float

    def summary(self) -> dict:
        loop = self.loop
        return {"run": str(self.run), "checkpoint": str(self.checkpoint), "steps": self.total_steps,
                "parameters": self.parameters, "val_loss": self.val_loss, "unigram_entropy": self.unigram_entropy,
                "training": None if loop is None else {"seconds": loop.seconds, "tokens": loop.tokens,
                                                       "final_loss": loop.last.get("loss")}}


def total_steps(cfg: RunConfig) -> int:
    train = cfg.train
    if train.tokens:
        return math.ceil(train.tokens / (train.global_batch_size * train.seq_len))
    return train.steps


def pretrain(
    cfg: RunConfig, corpus: Path, run: Path, resume: bool = False, progress: Progress | None = None,
    prepare_corpus: Callable[[], object] | None = None, preset_toml: str | None = None,
) -> PretrainResult | None:
    """Train `cfg`'s model on the corpus folder into the run folder. Collective under torchrun; returns the result on
    rank 0 (None elsewhere). `prepare_corpus`, when given, is called on rank 0 first (the others wait for it).
    `preset_toml`, the resolved preset, is saved in a new run folder as <preset name>.toml for --resume."""
    progress = progress or Quiet()
    world = distributed.setup(cfg)
    distributed.check_layout(cfg, world, context_parallel=True, expert_parallel=True, pipeline_parallel=True)
    layout = ContextLayout.setup(cfg, world)
    pipeline = PipelineLayout.setup(cfg, world)  # None without pipeline parallelism
    readers = pipeline or layout  # which rows this rank trains on
    configure_kernels(cfg)
    if prepare_corpus is not None and world.is_main:
        prepare_corpus()
    world.barrier()
    manifest, tokenizer = Manifest.load(corpus), Tokenizer.load(corpus)
    _check_fit(cfg, manifest)
    steps = total_steps(cfg)
    if not resume and world.is_main:
        start_run_folder(Path(run), cfg.name, preset_toml)

    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model, device=world.device)
    objective = distributed.prepare_model(CausalLMObjective(model, cfg.train.mtp_depths), cfg, world, progress.note,
                                          expert_parallel=True, pipeline=pipeline)
    optimizer = build_optimizer(objective, cfg.train)
    batches = PackedBatches(corpus, manifest, cfg.train.seq_len, cfg.train.micro_batch_size,
                            cfg.train.global_batch_size, steps, readers.data_rank, readers.data_size, cfg.train.seed)
    runner = None if pipeline is None else PipelineRunner(objective, pipeline, world)
    path = latest_resumable(run) if resume else None
    if path is not None and read_trainer_state(path).get("corpus") != manifest.fingerprint:
        raise UserError(f"cannot resume {run}: its corpus has changed since the run started (rerun it from scratch)")
    start, monitor_state = resume_loop(path, objective, optimizer, batches, world, progress.note)

    val = validation_batches(corpus, manifest, cfg.train.seq_len, cfg.train.eval_sequences, cfg.train.micro_batch_size)
    evaluate = validation(objective, val, cfg.precision.compute, world, layout, runner)
    result = None
    if start < steps:
        job = TrainingJob(
            train=cfg.train, compute=cfg.precision.compute, world=world, objective=objective, optimizer=optimizer, batches=batches,
            total_steps=steps, run=Path(run), tokenizer=tokenizer, progress=progress,
            flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len, cfg.train.mtp_depths),
            peak_flops=peak_flops(world.device, cfg.train.peak_tflops),
            evaluate=evaluate,
            trainer_state={"stage": "pretrain", "corpus": manifest.fingerprint, "preset": cfg.name,
                           "total_steps": steps},
            context=layout,
            pipeline=runner,
        )
        result = run_loop(job, start, monitor_state)
    val_loss = result.val_loss if result is not None else evaluate()  # a finished run, resumed: measure it again
    world.barrier()
    if not world.is_main:
        return None
    checkpoint = latest_resumable(run)
    final = from_pretrained(checkpoint, dtype=torch.float32)
    prompt_ids = _prompt(val, manifest)
    params = SamplingParams(max_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=40, seed=cfg.train.seed)
    sample = Engine(final, tokenizer, EngineConfig(max_batch=1)).generate([prompt_ids], params)[0].token_ids
    out = PretrainResult(
        run=Path(run), total_steps=steps, start_step=start, loop=result, unigram_entropy=manifest.unigram_entropy,
        checkpoint=checkpoint, prompt=tokenizer.decode(prompt_ids, skip_special=True),
        sample=tokenizer.decode(sample, skip_special=True), parameters=sum(p.numel() for p in final.parameters()),
        val_loss=val_loss,
    )
    write_json(Path(run) / "pretrain.json", out.summary())
    return out


def _check_fit(cfg: RunConfig, manifest: Manifest) -> None:
    """The corpus' vocabulary fits the model, and the MTP depths asked for exist."""
    if manifest.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"the corpus tokenizer has {manifest.vocab_size} tokens but the model only {cfg.model.vocab_size}: "
            f"set model.vocab_size={manifest.vocab_size} or prepare the corpus with --vocab-size {cfg.model.vocab_size}"
        )
    if cfg.train.mtp_depths and not cfg.model.mtp_pattern:
        raise UserError(f"train.mtp_depths = {cfg.train.mtp_depths} but the {cfg.shape} shape has no MTP block "
                        "(no '/' in model.pattern); set train.mtp_depths=0")


def _prompt(val: list, manifest: Manifest) -> list[int]:
    """The start of the first validation document (without its bos): text the model has not trained on."""
    ids = val[0].input_ids[0].tolist() if val else [manifest.bos_id]
    ids = [t for t in ids if t != manifest.bos_id]
    end = ids.index(manifest.eos_id) if manifest.eos_id in ids else len(ids)
    return ids[: min(end, PROMPT_TOKENS)] or ids[:1]
