"""`n3 rlvr`: reinforcement learning with verifiable rewards over several environments at once, GRPO family
(REFERENCE.md section 4): Nemotron 3's unified multi-environment RLVR.

A step: the step's prompts (a seeded blend of the environments' training prompts, the same on resume), `group_size`
replies to each sampled through the engine (continuous batching, reasoning on, temperature 1, the engine's
log-probs of the sampled tokens kept), scored by the environments (code in the sandbox), advantages per group,
zero-variance groups dropped, then `updates_per_batch` optimizer steps of the clipped policy loss on the packed
replies (stages.rollout), and the new weights go to the engine. The figure it moves: held-out accuracy on the
built-in tasks (stages.envs.suite), measured on the starting checkpoint and the final one.

Scale: under torchrun each rank samples for its share of the step's prompts, in its own engine, and the learner is
DDP or FSDP2 (as pretraining); token weights are shares of the global batch, so N ranks take the step one process
takes. With rlvr.server the replies come from an n3 serve (or any server with its weight-reload contract) that
reloads the learner's checkpoint after every step.

The run folder is a training run whose trainer.json says stage "rlvr", plus metrics.jsonl (a line per step),
rewards.png, rlvr.json (the summary) and tasks-before.json / tasks-after.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config
from model.errors import UserError
from presets import check_train
from presets.schema import RunConfig
from stages.envs.environments import Environment, TaskEnvironment, blend_prompts, load_environments, stage_seed
from stages.envs.sandbox import Runner
from stages.envs.suite import SuiteAccuracy, accuracy_before, checkpoint_accuracy, evaluate_suite, suite_problems
from stages.rollout.backend import Backend, engine_backend, rollout_context, step_seed
from stages.rollout.batches import rank_micro_batches
from stages.rollout.client import EndpointBackend
from stages.rollout.groups import GroupSettings, GroupStats, gather_env_means, score_groups, trajectories
from stages.rollout.learner import (
    PolicyLossSettings,
    PolicyObjective,
    Sampling,
    accumulate_policy_gradients,
    learner_logprobs,
    rollout_table,
)
from stages.rollout.weights import load_policy, policy_weights
from stages.runtime import distributed
from stages.runtime.checkpointing import (
    latest_resumable,
    load_checkpoint,
    save_checkpoint,
    start_run_folder,
    starting_point,
)
from stages.runtime.distributed import World
from stages.runtime.files import write_json
from stages.runtime.loop import apply_gradients
from stages.runtime.metrics import MetricsLog
from stages.runtime.optim import build_optimizer, set_lr, wsd_lr
from stages.runtime.plots import plot_curves
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import chat_tokenizer, configure_kernels

STAGE = "rlvr"


@dataclass
class RLVRResult:
    run: Path
    start: Path
    """The checkpoint RL started from."""
    environments: list[str]
    steps: int
    start_step: int
    seconds: float
    last: dict
    """The last step's metrics record."""
    checkpoint: Path
    before: SuiteAccuracy | None
    after: SuiteAccuracy | None

    def summary(self) -> dict:
        return {
            "run": str(self.run), "start": str(self.start), "checkpoint": str(self.checkpoint),
            "environments": self.environments, "steps": self.steps, "seconds": self.seconds, "last": self.last,
            "tasks_before": self.before.summary() if self.before else None,
            "tasks_after": self.after.summary() if self.after else None,
        }


def rlvr(cfg: RunConfig, run: Path, checkpoint: Path | None, resume: bool = False, progress: Progress | None = None,
         preset_toml: str | None = None) -> RLVRResult | None:
    """Train `checkpoint` (a checkpoint or run folder; on --resume the run's own) with RL on cfg.rlvr.envs into the
    run folder. Collective under torchrun; returns the result on rank 0, None elsewhere."""
    progress = progress or Quiet()
    world = distributed.setup(cfg)
    cfg = dataclasses.replace(cfg, rlvr=dataclasses.replace(
        cfg.rlvr, train=rollout_table(cfg.rlvr.train, world, cfg.parallel.data)))
    rl, train = cfg.rlvr, cfg.rlvr.train
    distributed.check_layout(cfg, world, train)
    configure_kernels(cfg)
    start, path, _ = starting_point(run, checkpoint, resume, STAGE, "an RLVR run")
    source = path or start
    tokenizer = chat_tokenizer(source, "n3 rlvr")
    check_train(cfg, "rlvr.train", config_from_hf(read_config(source)))
    runner = Runner(concurrent=rl.sandbox_workers, isolation=rl.isolation,
                    allow_weak_isolation=rl.allow_weak_isolation)
    envs = load_environments(rl.envs, rl.weights, runner=runner)
    if any(getattr(env, "task", None) is not None and env.task.name == "code" for env in envs.values()):
        progress.note(f"code sandbox: {runner.isolation}")  # refuses here, before any work, when it must
    suite = {name: env.levels for name, env in envs.items() if isinstance(env, TaskEnvironment)}
    if not resume and world.is_main:
        start_run_folder(Path(run), cfg.name, preset_toml)

    before = None
    if world.is_main and suite:
        before = accuracy_before(cfg, Path(run), start, suite, resume, rl.eval_problems, rl.eval_max_tokens,
                                 train.seed, progress, "held-out accuracy before RL")
    world.barrier()

    torch.manual_seed(train.seed)
    model = from_pretrained(source, dtype=torch.float32, device=world.device)
    objective = distributed.prepare_model(PolicyObjective(model), cfg, world, progress.note, train)
    optimizer = build_optimizer(objective, train)
    reference = _reference(cfg, start, world)
    start_step = 0
    if resume:
        trainer = load_checkpoint(path, objective, optimizer, world)
        start_step = trainer["step"]
        progress.note(f"resuming {run} from step {start_step} ({path.name})")
    plan = blend_prompts(envs, rl.weights, rl.prompts_per_step * train.steps, "train", stage_seed(STAGE, train.seed))
    conversations = [p.messages for p in plan]
    if rl.eval_interval and suite:  # the held-out checks during the run are answered by the same engine
        conversations += [[{"role": "user", "content": p.prompt}] for ps in _quick_problems(cfg, suite).values()
                          for p in ps]
    context = rollout_context(conversations, tokenizer, max(rl.max_tokens, rl.eval_max_tokens), train.seq_len,
                              enable_thinking=rl.reasoning)
    backend = _backend(cfg, source, world, progress, context)

    log = MetricsLog(Path(run) / "metrics.jsonl", resume_step=start_step or None) if world.is_main else None
    progress.start("RL steps", total=train.steps, completed=start_step)
    record: dict = {}
    started = time.perf_counter()
    for step in range(start_step, train.steps):
        prompts = plan[step * rl.prompts_per_step : (step + 1) * rl.prompts_per_step][world.rank :: world.size]
        record = rl_step(cfg, step, prompts, envs, backend, objective, optimizer, reference, world, Path(run),
                         tokenizer.pad_id or 0)
        if rl.eval_interval and (step + 1) % rl.eval_interval == 0 and world.is_main and suite:
            record["heldout_accuracy"] = _quick_accuracy(cfg, backend, suite)
        if log is not None:
            log.write(record)
        progress.advance(1, reward=record["reward"], accuracy=record["accuracy"],
                         seconds=record["seconds"]["step"])
        done = step + 1
        if done % train.checkpoint_interval == 0 or done == train.steps:
            state = {"stage": STAGE, "start": str(start), "preset": cfg.name, "total_steps": train.steps}
            save_checkpoint(Path(run), done, objective, optimizer, state, tokenizer, world, keep=train.keep_checkpoints)
        world.barrier()
    seconds = time.perf_counter() - started
    if not world.is_main:
        return None
    final = latest_resumable(run)
    if log is not None:
        progress.note(plot_curves(Path(run) / "metrics.jsonl", Path(run) / "rewards.png",
                                  [f"reward/{name}" for name in envs], "reward per environment"))
    after = None
    if suite:
        after = checkpoint_accuracy(cfg, final, suite, rl.eval_problems, rl.eval_max_tokens, train.seed, progress,
                                    "held-out accuracy after RL")
        write_json(Path(run) / "tasks-after.json", after.summary())
    out = RLVRResult(Path(run), start, list(envs), train.steps, start_step, seconds, record, final, before, after)
    write_json(Path(run) / "rlvr.json", out.summary())
    return out


def rl_step(cfg: RunConfig, step: int, prompts: list, envs: dict[str, Environment], backend: Backend, objective,
            optimizer, reference, world: World, run: Path, pad_id: int) -> dict:
    """One rollout batch and its updates; returns the step's metrics record (on every rank: the global figures)."""
    rl, train = cfg.rlvr, cfg.rlvr.train
    sampling = Sampling(rl.temperature, rl.top_k, rl.top_p)
    times, tick = {}, time.perf_counter()
    rollouts = backend.rollout(
        [p.messages for p in prompts], rl.max_tokens, n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
        top_k=rl.top_k, max_thinking_tokens=rl.max_thinking_tokens or None, seed=step_seed(train.seed, step, world.rank),
        enable_thinking=rl.reasoning,
    ) if prompts else []
    times["generate"], tick = time.perf_counter() - tick, time.perf_counter()
    groups = score_groups(lambda env, data, text: envs[env].score(data, text), [p.env for p in prompts],
                          [p.data for p in prompts], rollouts, rl.sandbox_workers)
    times["score"], tick = time.perf_counter() - tick, time.perf_counter()
    kept, stats = trajectories(groups, GroupSettings(rl.advantage, rl.filter_zero_variance, rl.overlong_buffer,
                                                     rl.max_tokens))
    micro_batches = rank_micro_batches(kept, rl.normalisation, train.seq_len, train.micro_batch_size, world,
                                      pad_id)
    if rl.updates_per_batch > 1:
        learner_logprobs(objective, micro_batches, sampling, cfg.precision.compute, world)
    times["logprobs"], tick = time.perf_counter() - tick, time.perf_counter()
    losses = PolicyLossSettings(rl.clip_low, rl.clip_high, rl.tis_cap, rl.kl_coeff)
    update = {}
    for _ in range(rl.updates_per_batch):
        lr = wsd_lr(step, train.steps, train)
        set_lr(optimizer, lr)
        update, load = accumulate_policy_gradients(objective, micro_batches, sampling, losses, cfg.precision.compute,
                                                   world, reference)
        update["grad_norm"] = apply_gradients(objective, optimizer, train, load)
        update["lr"] = lr
    load_policy(backend, policy_weights(objective, backend, run / "rollout-weights", step + 1), step + 1)
    times["update"] = time.perf_counter() - tick
    times["step"] = sum(times.values())
    return _record(step + 1, stats, rollouts, update, times, world)


def _record(step: int, stats: GroupStats, rollouts: list, update: dict, times: dict, world: World) -> dict:
    """The step's metrics.jsonl line, over every rank's samples."""
    generated = sum(len(r.token_ids) for group in rollouts for r in group)
    totals = world.all_reduce(torch.tensor([float(generated), float(stats.groups), float(stats.zero_variance),
                                            float(stats.errors)]))
    per_env = gather_env_means(stats.per_env, world)
    samples = max(1, sum(row["samples"] for row in per_env.values()))
    record = {
        "step": step,
        "reward": sum(row["reward"] * row["samples"] for row in per_env.values()) / samples,
        "accuracy": sum(row["accuracy"] * row["samples"] for row in per_env.values()) / samples,
        **{f"{key}/{env}": row[key] for env, row in per_env.items() for key in ("reward", "accuracy", "length")},
        "zero_variance": totals[2].item() / max(1.0, totals[1].item()),
        "dropped_errors": int(totals[3].item()),
        **update,
        "generated_tokens": int(totals[0].item()),
        "tokens_per_s": totals[0].item() / max(1e-9, times["generate"]),
        "seconds": times,
    }
    return record


def _backend(cfg: RunConfig, source: Path, world: World, progress: Progress, context: int) -> Backend:
    rl = cfg.rlvr
    if rl.server:
        if world.distributed:
            raise UserError("rlvr.server with torchrun: one learner process drives the server; run without torchrun")
        return EndpointBackend(rl.server, source, concurrency=rl.engine_batch)
    return engine_backend(source, cfg, progress.note, max_len=context, max_batch=rl.engine_batch)


def _reference(cfg: RunConfig, start: Path, world: World) -> PolicyObjective | None:
    """The frozen starting policy, for the KL term; none is loaded when kl_coeff is 0."""
    if cfg.rlvr.kl_coeff <= 0:
        return None
    reference = PolicyObjective(from_pretrained(start, dtype=torch.float32, device=world.device))
    reference.requires_grad_(False)
    return reference.train()


def _quick_accuracy(cfg: RunConfig, backend: Backend, suite: dict) -> float:
    """Mean held-out accuracy, reasoning on, of the weights generating now (rlvr.eval_interval): the rollout
    backend answers, so nothing is loaded."""
    result = evaluate_suite(backend, _quick_problems(cfg, suite), cfg.rlvr.eval_max_tokens, modes=("on",))
    return sum(r.accuracy for r in result.results) / max(1, len(result.results))


def _quick_problems(cfg: RunConfig, suite: dict) -> dict:
    return suite_problems(suite, "test", cfg.rlvr.eval_problems, cfg.rlvr.train.seed)
