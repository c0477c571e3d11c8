"""`n3 mtp-boost`: the last post-training stage of Nemotron 3 Ultra (REFERENCE.md section 4, MTP boosting): the MTP
head alone trains, distilled from its own frozen model under inference conditions, so that self-speculative decoding
accepts longer drafts.

1. Replies: the model answers the training prompts (the environments' train split, or a chat dataset's prompts) once
   each at temperature 1 through the engine (under torchrun each rank its share), and the held-out prompts (the test
   split, or the dataset's held-out share) likewise.
2. Training: the replies, packed best-fit into rows whose samples cannot see each other (seq_idx), go through the
   shared loop with runtime.distill's objective: backbone, embeddings and lm_head frozen, the loss the temperature-T
   KL from the backbone's next-token distribution to each of the N MTP depths' on the reply tokens, depth k's input
   chosen by mtp_boost.inputs. Only the MTP head has gradients, so the loop's clipping clips the MTP gradient alone.
3. With `init` (a checkpoint without an MTP head, Nemotron 3 Nano) the head of mtp_boost.init_pattern is built
   first (model.hybrid.with_mtp_head); the checkpoints carry it in the hub naming (mtp.*, num_nextn_predict_layers,
   mtp_hybrid_override_pattern).

The figures it moves, before and after on the held-out prompts: the acceptance length at draft lengths 1..N, greedy
and at temperature 1, the per-position acceptance (stages.eval.mtp, the function `n3 eval mtp` reports with), the
decode speedup at the fastest draft length, and each depth's KL to the backbone on the held-out replies.

The run folder: NAME.toml, replies/ (train.jsonl, heldout.jsonl: the token ids of every reply), before.json,
checkpoints/ (trainer.json stage "mtp-boost"), metrics.jsonl, acceptance.png, mtp-boost.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config
from model.config import ModelConfig
from model.errors import UserError
from model.hybrid import NemotronH, with_mtp_head
from model.tokenizer import Tokenizer
from presets import check_mtp_boost, check_train
from presets.schema import RunConfig
from stages.chat.masks import Sample
from stages.chat.packing import PackedChatBatches, PackedRows, pack
from stages.chat.sources import ChatSource, held_out, read_source
from stages.envs.environments import blend_prompts, load_environments, stage_seed
from stages.eval.mtp import AcceptanceResult, acceptance
from stages.rollout.backend import EngineBackend, engine_backend, rollout_context, step_seed
from stages.runtime import distributed
from stages.runtime.checkpointing import latest_resumable, resume_loop, start_run_folder, starting_point
from stages.runtime.distill import MTPDistillObjective
from stages.runtime.distributed import World
from stages.runtime.files import write_json, write_jsonl
from stages.runtime.loop import LoopResult, TrainingJob, run_loop
from stages.runtime.losses import head_token_counts
from stages.runtime.metrics import Clock, flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer
from stages.runtime.plots import plot_lines
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import chat_tokenizer, configure_kernels, engine_config

STAGE = "mtp-boost"
TEMPERATURES = {"greedy": 0.0, "temperature 1": 1.0}
"""The sampling settings acceptance is measured at."""


@dataclass
class Measured:
    """One checkpoint's figures on the held-out prompts."""

    kl: list[float]
    """Per MTP depth: mean KL (at temperature T) from the backbone's next-token distribution on held-out replies."""
    acceptance: dict[str, AcceptanceResult]
    """By the names of TEMPERATURES."""

    def summary(self) -> dict:
        return {"kl": self.kl, "acceptance": {name: a.summary() for name, a in self.acceptance.items()}}

    @classmethod
    def from_summary(cls, summary: dict) -> Measured:
        return cls(summary["kl"], {n: AcceptanceResult.from_summary(a) for n, a in summary["acceptance"].items()})


@dataclass
class MTPBoostResult:
    run: Path
    start: Path
    """The checkpoint whose MTP head was trained (or built, with init)."""
    initialised: bool
    replies: dict
    """Prompts, replies and reply tokens, train and held-out."""
    steps: int
    loop: LoopResult | None
    """None when the run was complete already."""
    checkpoint: Path
    before: Measured
    after: Measured
    seconds: dict[str, float]
    """Wall time of each part of this invocation: replies, before, training, after, and the total."""

    def summary(self) -> dict:
        loop = self.loop
        return {"run": str(self.run), "start": str(self.start), "initialised": self.initialised,
                "checkpoint": str(self.checkpoint), "steps": self.steps, "replies": self.replies,
                "seconds": self.seconds,
                "training": None if loop is None else {"seconds": loop.seconds, "tokens": loop.tokens,
                                                       "final_loss": loop.last.get("loss")},
                "before": self.before.summary(), "after": self.after.summary()}


def mtp_boost(cfg: RunConfig, run: Path, checkpoint: Path | None, init: bool = False,
              data: list[ChatSource] | None = None, resume: bool = False, progress: Progress | None = None,
              preset_toml: str | None = None) -> MTPBoostResult | None:
    """Train the MTP head of `checkpoint` (a checkpoint or run folder; on --resume the run's own) into the run folder:
    on the replies to the environments' prompts, or to `data`'s (chat sources). Collective under torchrun; returns
    the result on rank 0, None elsewhere."""
    progress, run, clock = progress or Quiet(), Path(run), Clock()
    mb, train = cfg.mtp_boost, cfg.mtp_boost.train
    check_mtp_boost(cfg)
    world = distributed.setup(cfg)
    distributed.check_layout(cfg, world, train)
    configure_kernels(cfg)
    start, path, trainer = starting_point(run, checkpoint, resume, STAGE, "an MTP-boost run")
    if trainer is not None:
        init, data = trainer["init"], [ChatSource(n, Path(p), w) for n, p, w in trainer["sources"] or []] or None
    tokenizer = chat_tokenizer(start, "n3 mtp-boost")
    model_cfg = config_from_hf(read_config(start))
    _check_head(model_cfg, start, init)
    check_train(cfg, "mtp_boost.train", model_cfg)
    if not resume and world.is_main:
        start_run_folder(run, cfg.name, preset_toml)
        for stale in ("replies/train.jsonl", "replies/heldout.jsonl", "before.json"):  # from a run that died early
            (run / stale).unlink(missing_ok=True)
    train_prompts, heldout_prompts = (_fitting(cfg, tokenizer, prompts, split, progress)
                                      for split, prompts in zip(("training", "held-out"), _prompts(cfg, data)))
    replies = _replies(cfg, start, tokenizer, train_prompts, heldout_prompts, run / "replies", world, progress)
    clock.lap("replies")

    torch.manual_seed(train.seed)
    model = from_pretrained(path or start, dtype=torch.float32, device=world.device)
    if init and path is None:
        model = with_mtp_head(model, mb.init_pattern)
        progress.note(f"built an MTP head of pattern {mb.init_pattern!r} for {start}")
    eval_prompts = [tokenizer.encode_chat(p, enable_thinking=mb.reasoning) for p in heldout_prompts]
    saved = run / "before.json"
    if path is not None and not saved.is_file():  # written before the first checkpoint: a resumed run has it
        raise UserError(f"cannot resume {run}: {saved.name}, the starting head's figures, is missing")
    before = Measured.from_summary(json.loads(saved.read_text())) if saved.is_file() else None
    # Measured on the model as loaded, before data-parallel wrappers (FSDP2) shard its weights.
    accepted = _acceptance(cfg, model, tokenizer, eval_prompts, "before", progress) \
        if before is None and world.is_main else None
    objective = distributed.prepare_model(MTPDistillObjective(model, train.mtp_depths, mb.temperature, mb.inputs),
                                          cfg, world, progress.note, train)
    heldout = _rows(replies["heldout"], train.seq_len, tokenizer).micro_batches(train.micro_batch_size)
    if before is None:
        before = Measured(_heldout_kl(objective, heldout, cfg.precision.compute, world), accepted)
        if world.is_main:
            write_json(saved, before.summary())
    clock.lap("before")

    optimizer = build_optimizer(objective, train)
    rows = _rows(replies["train"], train.seq_len, tokenizer)
    batches = PackedChatBatches(rows, train.micro_batch_size, train.global_batch_size, world.rank, world.size,
                                train.seed)
    steps = -(-train.tokens // (train.global_batch_size * train.seq_len)) if train.tokens else train.steps
    start_step, monitor_state = resume_loop(path, objective, optimizer, batches, world, progress.note)
    loop = None
    if start_step < steps:
        job = TrainingJob(
            train=train, compute=cfg.precision.compute, world=world, objective=objective, optimizer=optimizer,
            batches=batches, total_steps=steps, run=run, tokenizer=tokenizer, progress=progress,
            flops_per_token=flops_per_token(model.config, train.seq_len, train.mtp_depths),
            peak_flops=peak_flops(world.device, train.peak_tflops),
            trainer_state={"stage": STAGE, "start": str(start), "preset": cfg.name, "total_steps": steps,
                           "init": init, "sources": [[s.name, str(s.path), s.weight] for s in data] if data else None},
        )
        progress.note(f"distilling {train.mtp_depths} MTP depths at T = {mb.temperature} ({mb.inputs}) on "
                      f"{rows.stats.samples} replies in {len(rows)} rows")
        loop = run_loop(job, start_step, monitor_state)
    clock.lap("training")
    kl_after = _heldout_kl(objective, heldout, cfg.precision.compute, world)
    world.barrier()
    if not world.is_main:
        return None
    final = latest_resumable(run)
    trained = from_pretrained(final, dtype=torch.float32, device=world.device)
    after = Measured(kl_after, _acceptance(cfg, trained, tokenizer, eval_prompts, "after", progress))
    progress.note(_plot(run / "acceptance.png", before, after))
    clock.lap("after")
    summary = {name: {"prompts": len(r), "tokens": sum(len(x["token_ids"]) for x in r)} for name, r in replies.items()}
    out = MTPBoostResult(run, start, init, summary, steps, loop, final, before, after, clock.laps())
    write_json(run / "mtp-boost.json", out.summary())
    return out


def _check_head(model_cfg: ModelConfig, start: Path, init: bool) -> None:
    if init and model_cfg.mtp_pattern:
        raise UserError(f"{start} has an MTP head already (pattern {model_cfg.mtp_pattern!r}); drop --init to train it")
    if not init and not model_cfg.mtp_pattern:
        raise UserError(f"{start} has no MTP head; pass --init to build one (pattern mtp_boost.init_pattern) and train "
                        "it")


# --- prompts and replies ----------------------------------------------------------------------------------------
def _prompts(cfg: RunConfig, data: list[ChatSource] | None) -> tuple[list[list[dict]], list[list[dict]]]:
    """The training and held-out conversations to reply to: the environments' train and test splits, or the chat
    sources' conversations up to their last assistant turn (the held-out share by a hash of the prompt)."""
    mb = cfg.mtp_boost
    if data is None:
        envs = load_environments(mb.envs, mb.weights)
        seed = stage_seed(STAGE, mb.train.seed)
        return ([p.messages for p in blend_prompts(envs, mb.weights, mb.prompts, "train", seed)],
                [p.messages for p in blend_prompts(envs, mb.weights, mb.eval_prompts, "test", seed)])
    conversations = [c for source in data for c in read_source(source)[0]]
    split = {True: [], False: []}
    for c in conversations:
        split[held_out(c, mb.val_fraction)].append(_before_reply(c.messages))
    if not split[False] or not split[True]:
        raise UserError(f"{len(conversations)} conversations in --data leave none to "
                        f"{'train on' if not split[False] else 'hold out'} (mtp_boost.val_fraction "
                        f"{mb.val_fraction}); give more conversations")
    return split[False][: mb.prompts], split[True][: mb.eval_prompts]


def _fitting(cfg: RunConfig, tokenizer: Tokenizer, prompts: list[list[dict]], split: str, progress: Progress
             ) -> list[list[dict]]:
    """The prompts that leave room for a reply of mtp_boost.max_tokens in a row of mtp_boost.train.seq_len tokens
    (the others are left out, and counted)."""
    mb = cfg.mtp_boost
    room = mb.train.seq_len - mb.max_tokens
    kept = [p for p in prompts if len(tokenizer.encode_chat(p, enable_thinking=mb.reasoning)) <= room]
    if not kept:
        raise UserError(f"no {split} prompt leaves room for a reply of mtp_boost.max_tokens ({mb.max_tokens}) in "
                        f"mtp_boost.train.seq_len ({mb.train.seq_len}) tokens; raise seq_len or lower max_tokens")
    if len(kept) < len(prompts):
        progress.note(f"left out {len(prompts) - len(kept)} of {len(prompts)} {split} prompts longer than "
                      f"{room} tokens (mtp_boost.train.seq_len - mtp_boost.max_tokens)")
    return kept


def _before_reply(messages: list[dict]) -> list[dict]:
    """A conversation up to its last assistant turn: what the model replies to."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def _replies(cfg: RunConfig, start: Path, tokenizer: Tokenizer, train: list, heldout: list, folder: Path,
             world: World, progress: Progress) -> dict[str, list[dict]]:
    """The model's replies (token ids) to the training and held-out prompts, at temperature 1; each rank generates its
    share, rank 0 writes the sets (a resumed run reads them)."""
    mb = cfg.mtp_boost
    files = {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}
    if not all(f.is_file() for f in files.values()):
        context = rollout_context(train + heldout, tokenizer, mb.max_tokens, mb.train.seq_len,
                                  enable_thinking=mb.reasoning)
        backend = engine_backend(start, cfg, progress.note, max_len=context, max_batch=mb.engine_batch,
                                 speculative_tokens=0)
        for name, prompts in (("train", train), ("heldout", heldout)):
            mine = _generate(backend, prompts[world.rank :: world.size], mb, world.rank, name, progress)
            gathered = world.gather(mine)
            if world.is_main:
                write_jsonl(files[name], [row for rank_rows in gathered for row in rank_rows])
        del backend
    world.barrier()
    return {name: [json.loads(line) for line in f.read_text().splitlines()] for name, f in files.items()}


def _generate(backend: EngineBackend, prompts: list, mb, rank: int, name: str, progress: Progress) -> list[dict]:
    progress.start(f"replies to the {name} prompts (temperature 1)", total=len(prompts))
    rows = []
    for first in range(0, len(prompts), mb.engine_batch):
        chunk = prompts[first : first + mb.engine_batch]
        seed = step_seed(mb.train.seed, -1 - first if name == "heldout" else first, rank)
        for (reply,) in backend.rollout(chunk, mb.max_tokens, n=1, temperature=1.0, seed=seed,
                                        enable_thinking=mb.reasoning):
            rows.append({"prompt_ids": reply.prompt_ids, "token_ids": reply.token_ids})
        progress.advance(len(chunk))
    return rows


def _rows(replies: list[dict], seq_len: int, tokenizer: Tokenizer) -> PackedRows:
    """The replies as packed rows: every reply token a target, the prompt's none."""
    samples = [Sample(np.array(r["prompt_ids"] + r["token_ids"], dtype=np.int64),
                      np.array([False] * len(r["prompt_ids"]) + [True] * len(r["token_ids"])), str(i))
               for i, r in enumerate(replies) if r["token_ids"]]
    rows = pack(samples, seq_len, tokenizer.pad_id)
    if not len(rows):
        raise UserError(f"no reply fits mtp_boost.train.seq_len ({seq_len}) with its prompt; raise it")
    return rows


# --- measuring --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _heldout_kl(objective, batches: list, compute: str, world: World) -> list[float]:
    """Per MTP depth, the mean KL to the backbone over the held-out replies' reply tokens (every rank the same)."""
    unwrapped = distributed.unwrap(objective)
    sums = torch.zeros(unwrapped.heads)
    counts = torch.zeros(unwrapped.heads)
    unwrapped.eval()
    for mb in batches:
        with distributed.autocast(compute, world):
            out = unwrapped(mb.input_ids.to(world.device), mb.labels.to(world.device),
                            seq_idx=mb.seq_idx.to(world.device))
        sums += out["head_sums"].cpu()
        counts += head_token_counts(mb.labels, unwrapped.mtp_depths, mb.seq_idx)
    unwrapped.train()
    return (sums / counts.clamp(min=1))[1:].tolist()


def _acceptance(cfg: RunConfig, model: NemotronH, tokenizer: Tokenizer, prompts: list[list[int]], when: str,
                progress: Progress) -> dict[str, AcceptanceResult]:
    """Acceptance and speed at every draft length up to N, greedy and at temperature 1, in an eager engine (the
    timings compare draft lengths, not compilations)."""
    from model.engine import Engine

    mb = cfg.mtp_boost
    context = max(map(len, prompts)) + mb.eval_max_tokens + mb.train.mtp_depths + 2
    config = engine_config(cfg, max_len=context, max_batch=len(prompts), speculative_tokens=mb.train.mtp_depths,
                           compile=False)
    backend = EngineBackend(Engine(model, tokenizer, config), when)
    progress.start(f"acceptance {when}: greedy and temperature 1, draft lengths 0..{mb.train.mtp_depths}",
                   total=len(TEMPERATURES))
    results = {}
    for name, temperature in TEMPERATURES.items():
        results[name] = acceptance(backend, prompts, mb.eval_max_tokens, "held-out prompts", temperature)
        progress.advance(1)
    return results


def _plot(out: Path, before: Measured, after: Measured) -> str:
    series = {f"{name}, {when}": (list(range(1, len(m.acceptance[name].rates) + 1)), m.acceptance[name].rates)
              for name in TEMPERATURES for when, m in (("after", after), ("before", before))}
    return plot_lines(series, out, "draft position", "share of steps that accept the draft at each position")


