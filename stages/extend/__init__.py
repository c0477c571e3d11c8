"""`n3 extend`: the long-context phase that ends pretraining (REFERENCE.md section 2). The attention layers have no
positional embedding, so nothing is rescaled: the model continues pretraining on long rows, at a constant learning
rate (default: the starting run's min_lr) without warmup, each iteration all at the long length or all at the short
one (Ultra: 92% / 8%), the same tokens in every iteration, documents kept apart by document masking.

The data (stages.extend.data): repository-level documents, synthetic retrieval, and the pretraining corpus. The
figures it moves, before and after, on the starting checkpoint and the final one: the loss by position on held-out
repository documents up to the new length (stages.extend.positions), RULER niah_single_1, niah_multikey_1 and vt at
extend.ruler_lengths, and the short-context validation loss on the corpus (which must recover to within 2% of the
start). The checkpoints record the new context (max_position_embeddings), which `n3 serve` and `n3 eval` take.

The run folder is a training run (runtime/checkpointing.py) whose trainer.json says stage "extend", plus
`before.json` (the starting checkpoint's figures, kept for --resume), `extend.json` and `positions.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config
from model.config import ModelConfig
from model.errors import UserError
from model.tokenizer import Tokenizer
from presets import check_extend, check_train
from presets.schema import RunConfig
from stages.eval.ruler import RulerOptions, run_ruler
from stages.extend.data import (
    CorpusWindows,
    Documents,
    ExtendBatches,
    Retrieval,
    filler_vocabulary,
    held_out_packages,
    repository_documents,
    user_documents,
)
from stages.extend.positions import PositionLoss, bucket_edges, loss_by_position
from stages.rollout.backend import engine_backend
from stages.runtime import distributed
from stages.runtime.batches import validation_batches
from stages.runtime.checkpointing import latest_resumable, read_trainer_state, resume_loop, start_run_folder, starting_point
from stages.runtime.context import ContextLayout
from stages.runtime.corpus import Manifest
from stages.runtime.distributed import World
from stages.runtime.files import write_json
from stages.runtime.loop import LoopResult, TrainingJob, run_loop, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import Clock, flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer
from stages.runtime.plots import plot_lines
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import configure_kernels

STAGE = "extend"
RULER_TASKS = ["niah_single_1", "niah_multikey_1", "vt"]


@dataclass
class LongContextFigures:
    """What the phase moves, measured on one checkpoint."""

    positions: PositionLoss
    ruler: dict[str, dict[int, float]]
    """task -> length -> score x 100."""
    short_loss: float | None
    """Validation loss on the pretraining corpus at the short length (None without a validation split)."""

    def ruler_mean(self, length: int) -> float:
        return sum(scores[length] for scores in self.ruler.values()) / len(self.ruler)

    def summary(self) -> dict:
        return {"positions": self.positions.summary(), "short_loss": self.short_loss,
                "ruler": {task: {str(n): s for n, s in scores.items()} for task, scores in self.ruler.items()}}

    @classmethod
    def from_summary(cls, summary: dict) -> LongContextFigures:
        ruler = {task: {int(n): s for n, s in scores.items()} for task, scores in summary["ruler"].items()}
        return cls(PositionLoss.from_summary(summary["positions"]), ruler, summary["short_loss"])


@dataclass
class ExtendResult:
    run: Path
    start: Path
    checkpoint: Path
    seq_len: int
    short_len: int
    lr: float
    total_steps: int
    short_steps: int
    start_step: int
    loop: LoopResult | None
    """None when the run was complete already."""
    sources: list[str]
    before: LongContextFigures
    after: LongContextFigures
    plot: str
    seconds: dict[str, float]
    """Wall time by part: before (0 when resumed from before.json), training, after, total."""

    def summary(self) -> dict:
        loop = self.loop
        return {
            "run": str(self.run), "start": str(self.start), "checkpoint": str(self.checkpoint),
            "seq_len": self.seq_len, "short_len": self.short_len, "lr": self.lr, "steps": self.total_steps,
            "short_steps": self.short_steps, "sources": self.sources,
            "training": None if loop is None else {"seconds": loop.seconds, "tokens": loop.tokens,
                                                   "final_loss": loop.last.get("loss")},
            "before": self.before.summary(), "after": self.after.summary(), "seconds": self.seconds,
        }


def extend(
    cfg: RunConfig, run: Path, checkpoint: Path | None, corpus: Path, resume: bool = False,
    progress: Progress | None = None, prepare_corpus: Callable[[], object] | None = None,
    preset_toml: str | None = None,
) -> ExtendResult | None:
    """Extend `checkpoint` (a checkpoint or a run folder's newest; on --resume the run's own) to extend.train.seq_len
    on long rows and `corpus` (the pretraining corpus folder, for the short iterations and the short-context loss;
    `prepare_corpus`, when given, is called on rank 0 first) into the run folder. Collective under torchrun; returns
    the result on rank 0, None elsewhere."""
    progress, clock = progress or Quiet(), Clock()
    ext = cfg.extend
    world = distributed.setup(cfg)
    start, path, trainer = starting_point(run, checkpoint, resume, STAGE, "an extend run")
    source = path or start
    tokenizer = Tokenizer.load(source)
    start_config = config_from_hf(read_config(start))
    long, short = ext.train.seq_len, ext.short_seq_len
    if long <= start_config.max_position_embeddings:
        raise UserError(f"extend.train.seq_len ({long}) must be above the context of {start} "
                        f"({start_config.max_position_embeddings} tokens): set a longer --seq-len")
    if trainer is not None and trainer.get("seq_len") != long:
        raise UserError(f"cannot resume {run} at {long} tokens: it extends to {trainer.get('seq_len')} (drop --seq-len)")
    lr = ext.train.lr or starting_min_lr(start, cfg, progress)
    train = dataclasses.replace(ext.train, lr=lr, min_lr=lr)  # constant
    cfg = phase_config(dataclasses.replace(cfg, extend=dataclasses.replace(ext, train=train)), start_config)
    check_extend(cfg)
    check_train(cfg, "extend.train")
    model_config = cfg.model
    distributed.check_layout(cfg, world, train, model=model_config, context_parallel=True)
    layout = ContextLayout.setup(cfg, world)
    configure_kernels(cfg)
    if prepare_corpus is not None and world.is_main:
        prepare_corpus()
    world.barrier()
    manifest = Manifest.load(corpus)
    _check_corpus(corpus, tokenizer)
    steps = math.ceil(train.tokens / (train.global_batch_size * long)) if train.tokens else train.steps
    if not resume and world.is_main:
        start_run_folder(Path(run), cfg.name, preset_toml)

    repository = repository_documents()
    held_out = held_out_packages(repository, tokenizer, ext.eval_documents, long + 1)
    short_val = validation_batches(corpus, manifest, short, ext.eval_sequences, train.micro_batch_size * long // short)
    measure_on = lambda ckpt, title: measure(cfg, ckpt, list(held_out.values()), short_val, progress, title)
    before = None
    if world.is_main:
        before = _before(Path(run), start, resume, measure_on)
    world.barrier()
    clock.lap("before")

    torch.manual_seed(train.seed)
    model = from_pretrained(source, dtype=torch.float32, device=world.device)
    model.config = model_config
    depths = train.mtp_depths if model.mtp is not None else 0
    objective = distributed.prepare_model(CausalLMObjective(model, depths), cfg, world, progress.note, train)
    optimizer = build_optimizer(objective, train)
    corpus_windows = CorpusWindows(corpus, manifest)
    training_texts = [text for package, text in repository.items() if package not in held_out]
    sources = long_sources(ext.data, tokenizer, training_texts, corpus_windows, short)
    batches = ExtendBatches(list(sources.values()), ext.weights, corpus_windows, long, short,
                            ext.short_fraction, train.global_batch_size, train.micro_batch_size, tokenizer.bos_id,
                            tokenizer.eos_id, ext.document_masking, layout.data_rank, layout.data_size, train.seed)
    start_step, monitor_state = resume_loop(path, objective, optimizer, batches, world, progress.note)

    result = None
    if start_step < steps:
        job = TrainingJob(
            train=train, compute=cfg.precision.compute, world=world, objective=objective, optimizer=optimizer,
            batches=batches, total_steps=steps, run=Path(run), tokenizer=tokenizer, progress=progress,
            flops_per_token=flops_per_token(model_config, long, depths),
            peak_flops=peak_flops(world.device, train.peak_tflops),
            evaluate=validation(objective, short_val, cfg.precision.compute, world, layout),
            trainer_state={"stage": STAGE, "start": str(start), "preset": cfg.name, "total_steps": steps,
                           "seq_len": long, "sources": list(sources)},
            context=layout,
        )
        result = run_loop(job, start_step, monitor_state)
    world.barrier()
    if not world.is_main:
        return None
    clock.lap("training")
    final = latest_resumable(run)
    after = measure_on(final, "after the long-context phase")
    clock.lap("after")
    edges = before.positions.edges
    plot = plot_lines({f"{label}": (edges[:-1], figures.positions.nll)
                       for label, figures in (("before", before), ("after", after))},
                      Path(run) / "positions.png", "position (bucket start, tokens)",
                      f"loss by position on {len(held_out)} held-out repository documents")
    out = ExtendResult(Path(run), start, final, long, short, train.lr, steps,
                       sum(batches.is_short(s) for s in range(steps)), start_step, result, list(sources), before,
                       after, plot, clock.laps())
    write_json(Path(run) / "extend.json", out.summary())
    return out


def phase_config(cfg: RunConfig, model: ModelConfig) -> RunConfig:
    """The run as the phase trains it: [extend.train] as the optimisation table, the phase's context-parallel degree
    (extend.context_parallel, else parallel.context), and `model` with its context at the long length. Raises
    UserError where the degree does not fit the model's Mamba heads or the rows' lengths."""
    ext = cfg.extend
    context = ext.context_parallel or cfg.parallel.context
    problem = model.context_parallel_problem(context)
    if problem is None and (ext.train.seq_len % context or ext.short_seq_len % context):
        problem = (f"the context-parallel degree ({context}) must divide extend.train.seq_len ({ext.train.seq_len}) "
                   f"and extend.short_seq_len ({ext.short_seq_len}): each rank takes an equal slice of every row")
    if problem:
        raise UserError(f"preset {cfg.name}: {problem}")
    parallel = dataclasses.replace(cfg.parallel, context=context)
    model = dataclasses.replace(model, max_position_embeddings=ext.train.seq_len)
    return dataclasses.replace(cfg, train=ext.train, parallel=parallel, model=model)


def starting_min_lr(start: Path, cfg: RunConfig, progress: Progress) -> float:
    """The min_lr of the pretraining run the checkpoint comes from (its saved preset), else the preset's own
    [train].min_lr, said so."""
    run = start.parent.parent
    try:
        preset = read_trainer_state(start)["preset"]
        return float(tomllib.loads((run / f"{preset}.toml").read_text())["train"]["min_lr"])
    except (UserError, OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError):
        progress.note(f"{start} has no pretraining run to take min_lr from: extend.train.lr = train.min_lr "
                      f"({cfg.train.min_lr}) of preset {cfg.name}")
        return cfg.train.min_lr


def long_sources(names: list[str], tokenizer: Tokenizer, texts: list[str], corpus: CorpusWindows, short_len: int
                 ) -> dict[str, object]:
    """The sources of extend.data by name, each with `row(rng, length)`: `texts` are the repository documents
    training may draw (the held-out packages left out), `corpus` the pretraining corpus' windows."""
    repository = Documents.from_texts("repository", texts, tokenizer) if {"repository", "retrieval"} & set(names) \
        else None
    out: dict[str, object] = {}
    for name in names:
        if name == "repository":
            out[name] = repository
        elif name == "retrieval":
            out[name] = Retrieval(repository.without_markers("filler"), tokenizer, filler_vocabulary(texts))
        elif name == "corpus":
            out[name] = corpus
        else:
            docs = user_documents(name, tokenizer, short_len)
            out[docs.name] = docs
    return out


def measure(cfg: RunConfig, checkpoint: Path, documents: list, short_val: list, progress: Progress,
            title: str) -> LongContextFigures:
    """The figures of one checkpoint, in this process: loss by position on the held-out documents at the long length,
    the short-context validation loss, and RULER (greedy, through an in-process engine with the long context)."""
    ext = cfg.extend
    long = ext.train.seq_len
    progress.note(f"{title}: loss by position, short-context loss, RULER")
    model = from_pretrained(checkpoint, dtype=torch.float32)
    positions = loss_by_position(model, documents, long, bucket_edges(ext.short_seq_len, long))
    single = World(0, 1, 0, torch.device("cpu"))
    short_loss = validation(CausalLMObjective(model, 0), short_val, "fp32", single)()
    # Eager: compiling the decode step costs more than the few hundred answers it would speed up.
    backend = engine_backend(checkpoint, cfg, progress.note, max_len=long, compile=False)
    options = RulerOptions(lengths=ext.ruler_lengths, samples=ext.ruler_samples, tasks=RULER_TASKS,
                           seed=ext.train.seed)
    total = len(RULER_TASKS) * len(ext.ruler_lengths) * ext.ruler_samples
    progress.start(f"RULER, {title}", total=total)
    ruler = run_ruler(backend, options, lambda n: progress.advance(n))
    return LongContextFigures(positions, ruler.scores, short_loss)


def _before(run: Path, start: Path, resume: bool, measure_on) -> LongContextFigures:
    """The starting checkpoint's figures: measured once, kept in the run folder for --resume."""
    saved = run / "before.json"
    if resume and saved.is_file():
        return LongContextFigures.from_summary(json.loads(saved.read_text()))
    before = measure_on(start, "before the long-context phase")
    write_json(saved, before.summary())
    return before


def _check_corpus(corpus: Path, tokenizer: Tokenizer) -> None:
    saved = corpus / "tokenizer.json"
    if saved.is_file() and Tokenizer.load(saved).backend.get_vocab() != tokenizer.backend.get_vocab():
        raise UserError(f"the corpus {corpus} was tokenized with another tokenizer than the checkpoint's; give the "
                        "pretraining run's corpus (data.path)")
