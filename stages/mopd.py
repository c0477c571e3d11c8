"""`n3 mopd`: multi-teacher on-policy distillation (REFERENCE.md section 4), the Nemotron 3 Ultra report's
post-training method: each domain's teacher scores the student's own samples token by token.

A cycle is a warmup and a distillation. The warmup: each teacher answers its domain's training prompts, the replies
its environment passes become chat data, and the student takes mopd.warmup.steps of SFT on them (stages.chat and the
shared loop), so that its samples start inside the teachers' support. The distillation: mopd.train.steps rollout
batches, each a seeded blend of the domains' prompts (lambda = the domain's weight), one sample each through the
engine (reasoning on, temperature 1, the engine's log-probs kept as pi_behav); the teacher of each sample's domain
scores its reply tokens; the learner's forward gives pi_prox, the advantage is A_t = sg[log pi_T - log pi_prox] (plus
mopd.orm_weight x the environment's reward less the domain's mean), and the update is the decoupled clipped surrogate
with the behaviour correction pi_prox / pi_behav capped or masked, over the batch's tokens (stages.rollout). The
three run as a pipeline (stages.rollout.pipeline): rollouts at most mopd.max_staleness policy versions old.

The figures it moves: the reverse KL to each domain's teacher on the student's samples, and held-out accuracy on the
built-in tasks, the student's before and after against each teacher's own on its domain.

The run folder: NAME.toml, mopd-run.json (the student and the teachers), warmup-<cycle>/ (the warmup's data and
training run), checkpoints/ (the distillation's: step numbers count on across cycles, trainer.json stage "mopd"),
metrics.jsonl, reverse_kl.png, tasks-before.json, teachers.json, tasks-after.json, mopd.json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import config_from_hf, from_pretrained, read_config, resolve_checkpoint, run_checkpoints
from model.errors import UserError
from model.tokenizer import Tokenizer
from presets import check_train
from presets.schema import RunConfig
from stages.chat.data import ChatDataOptions, build_chat_data
from stages.chat.packing import PackedChatBatches
from stages.chat.reasoning import ReasoningMix
from stages.chat.sources import ChatSource
from stages.envs.environments import Environment, TaskEnvironment, blend_prompts, load_environments, stage_seed
from stages.envs.sandbox import Runner
from stages.envs.suite import SuiteAccuracy, accuracy_before, checkpoint_accuracy, evaluate_suite, suite_problems
from stages.rollout.backend import Backend, engine_backend, rollout_context, step_seed
from stages.rollout.batches import Trajectory, rank_micro_batches
from stages.rollout.groups import MEANS, gather_env_means, score_groups
from stages.rollout.learner import (
    PolicyLossSettings,
    PolicyObjective,
    Sampling,
    accumulate_policy_gradients,
    rollout_table,
)
from stages.rollout.losses import outcome_advantages
from stages.rollout.pipeline import Mailbox, run_pipeline
from stages.rollout.teachers import Teacher, load_teacher
from stages.rollout.weights import load_policy, policy_weights
from stages.runtime import distributed
from stages.runtime.checkpointing import load_checkpoint, resume_loop, save_checkpoint, start_run_folder, stage_of
from stages.runtime.distributed import World
from stages.runtime.files import write_json, write_jsonl, write_text
from stages.runtime.loop import TrainingJob, apply_gradients, run_loop, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import MetricsLog, flops_per_token, peak_flops
from stages.runtime.optim import build_optimizer, set_lr, wsd_lr
from stages.runtime.plots import plot_curves
from stages.runtime.progress import Progress, Quiet
from stages.runtime.settings import chat_tokenizer, configure_kernels

STAGE = "mopd"
WARMUP_STAGE = "mopd-warmup"
RUN_FILE = "mopd-run.json"


@dataclass
class MOPDResult:
    run: Path
    student: Path
    """The checkpoint distillation started from."""
    teachers: dict[str, str]
    """Domain -> source."""
    steps: int
    seconds: float
    last: dict
    checkpoint: Path
    before: SuiteAccuracy | None
    teacher_accuracy: dict[str, SuiteAccuracy]
    """Each teacher's held-out accuracy on its own domain (built-in domains)."""
    after: SuiteAccuracy | None

    def summary(self) -> dict:
        return {
            "run": str(self.run), "student": str(self.student), "teachers": self.teachers,
            "checkpoint": str(self.checkpoint), "steps": self.steps, "seconds": self.seconds, "last": self.last,
            "tasks_before": self.before.summary() if self.before else None,
            "teachers_accuracy": {d: a.summary() for d, a in self.teacher_accuracy.items()},
            "tasks_after": self.after.summary() if self.after else None,
        }


def mopd(cfg: RunConfig, run: Path, student: Path | None, teachers: dict[str, str], resume: bool = False,
         progress: Progress | None = None, preset_toml: str | None = None) -> MOPDResult | None:
    """Distill `teachers` (domain -> checkpoint or URL) into `student` (a checkpoint or run folder) on the domains of
    cfg.mopd.envs, into the run folder; on --resume the run's own student and teachers. Collective under torchrun;
    returns the result on rank 0, None elsewhere."""
    progress = progress or Quiet()
    world = distributed.setup(cfg)
    cfg = dataclasses.replace(cfg, mopd=dataclasses.replace(
        cfg.mopd, train=rollout_table(cfg.mopd.train, world, cfg.parallel.data)))
    md, run = cfg.mopd, Path(run)
    distributed.check_layout(cfg, world, md.train)
    configure_kernels(cfg)
    student, teachers = _run_inputs(run, student, teachers, resume)
    tokenizer = chat_tokenizer(student, "n3 mopd")
    model_cfg = config_from_hf(read_config(student))
    check_train(cfg, "mopd.train", model_cfg)
    if md.warmup.steps:
        distributed.check_layout(cfg, world, md.warmup)
        check_train(cfg, "mopd.warmup", model_cfg)
    runner = Runner(concurrent=md.sandbox_workers, isolation=md.isolation,
                    allow_weak_isolation=md.allow_weak_isolation)
    envs = load_environments(md.envs, md.weights, runner=runner)
    missing = [name for name in envs if name not in teachers]
    unknown = [name for name in teachers if name not in envs]
    if unknown:
        raise UserError(f"a teacher for {', '.join(unknown)}, which no environment provides (the environments: "
                        f"{', '.join(envs)})")
    if missing:
        raise UserError(f"no teacher for {', '.join(missing)}: give --teacher {missing[0]}=CHECKPOINT_OR_URL")
    loaded = {name: load_teacher(name, source, student, tokenizer, cfg, progress.note)
              for name, source in teachers.items()}
    if not resume and world.is_main:
        start_run_folder(run, cfg.name, preset_toml)
        for stale in run.glob("warmup-*"):  # from a run that died before its first distillation checkpoint
            shutil.rmtree(stale)
        (run / "teachers.json").unlink(missing_ok=True)
        write_json(run / RUN_FILE, {"student": str(student), "teachers": teachers})
    suite = {name: env.levels for name, env in envs.items() if isinstance(env, TaskEnvironment)}

    before, teacher_accuracy = None, {}
    if world.is_main and suite:
        before = accuracy_before(cfg, run, student, suite, resume, md.eval_problems, md.eval_max_tokens,
                                 md.train.seed, progress, "held-out accuracy of the student before MOPD")
        teacher_accuracy = _teachers_accuracy(cfg, run, loaded, suite, progress)
    world.barrier()

    steps, started, last = md.cycles * md.train.steps, time.perf_counter(), {}
    current = student
    for cycle in range(1, md.cycles + 1):
        if md.warmup.steps:
            current = _warmup(cfg, cycle, current, loaded, envs, run, tokenizer, world, progress)
        last = _distill(cfg, cycle, current, loaded, envs, run, tokenizer, world, progress) or last
        current = resolve_checkpoint(run)
    seconds = time.perf_counter() - started
    if not world.is_main:
        return None
    progress.note(plot_curves(run / "metrics.jsonl", run / "reverse_kl.png", [f"reverse_kl/{d}" for d in envs],
                              "reverse KL to the teacher (nats per token)"))
    after = None
    if suite:
        after = checkpoint_accuracy(cfg, current, suite, md.eval_problems, md.eval_max_tokens, md.train.seed,
                                    progress, "held-out accuracy of the student after MOPD")
        write_json(run / "tasks-after.json", after.summary())
    out = MOPDResult(run, student, teachers, steps, seconds, last, current, before, teacher_accuracy, after)
    write_json(run / "mopd.json", out.summary())
    return out


def _run_inputs(run: Path, student: Path | None, teachers: dict[str, str], resume: bool
                ) -> tuple[Path, dict[str, str]]:
    """The student checkpoint and the teachers: as given, or on --resume as the run started with."""
    if not resume:
        if student is None:
            raise UserError("give the student: --checkpoint DIR")
        return resolve_checkpoint(student), teachers
    saved = run / RUN_FILE
    if not saved.is_file():
        raise UserError(f"cannot resume {run}: it is not an MOPD run (no {RUN_FILE}); start a new run without --resume")
    state = json.loads(saved.read_text())
    return Path(state["student"]), state["teachers"]


def _teachers_accuracy(cfg: RunConfig, run: Path, teachers: dict[str, Teacher], suite: dict, progress: Progress
                       ) -> dict[str, SuiteAccuracy]:
    """Each teacher's held-out accuracy on its own built-in domain (what the student is measured against): measured
    once, kept in teachers.json."""
    md, saved = cfg.mopd, run / "teachers.json"
    if saved.is_file():
        return {d: SuiteAccuracy.from_summary(s) for d, s in json.loads(saved.read_text()).items()}
    measured = {}
    for domain, teacher in teachers.items():
        if domain not in suite:
            continue
        problems = suite_problems({domain: suite[domain]}, "test", md.eval_problems, md.train.seed)
        progress.start(f"held-out accuracy of the {domain} teacher", total=2 * len(problems[domain]))
        measured[domain] = evaluate_suite(teacher.backend, problems, md.eval_max_tokens, advance=progress.advance)
    write_json(saved, {d: a.summary() for d, a in measured.items()})
    return measured


# --- warmup ---------------------------------------------------------------------------------------------------------
def _warmup(cfg: RunConfig, cycle: int, start: Path, teachers: dict[str, Teacher], envs: dict[str, Environment],
            run: Path, tokenizer: Tokenizer, world: World, progress: Progress) -> Path:
    """Cycle `cycle`'s warmup SFT of the checkpoint `start` on the teachers' replies; returns its final checkpoint
    (at once when a resumed run finished it already)."""
    md, warm = cfg.mopd, cfg.mopd.warmup
    folder = run / f"warmup-{cycle}"
    done = _newest_step(folder)
    if done is not None and done[0] >= warm.steps:
        return done[1]
    data = folder / "data"
    if world.is_main and not (data / "done").is_file():
        _teacher_replies(cfg, cycle, teachers, envs, data, progress)
    world.barrier()
    # SFT's mix of reasoning modes: the warmup does not unteach answering without a thought.
    options = ChatDataOptions(seq_len=warm.seq_len, seed=warm.seed,
                              reasoning=ReasoningMix(cfg.sft.reasoning_off, cfg.sft.reasoning_truncated))
    chat = build_chat_data(tokenizer, options,
                           [ChatSource(name, data / f"{name}.jsonl", weight)
                            for name, weight in zip(envs, md.weights or [1.0] * len(envs))], progress=progress)
    model = from_pretrained(start, dtype=torch.float32, device=world.device)
    objective = distributed.prepare_model(CausalLMObjective(model, 0), cfg, world, progress.note, warm)
    optimizer = build_optimizer(objective, warm)
    batches = PackedChatBatches(chat.train, warm.micro_batch_size, warm.global_batch_size, world.rank, world.size,
                                warm.seed)
    start_step = 0
    if done is not None:
        start_step, _ = resume_loop(done[1], objective, optimizer, batches, world)
    val = chat.val.micro_batches(warm.micro_batch_size)[:4] if chat.val is not None else []
    job = TrainingJob(
        train=warm, compute=cfg.precision.compute, world=world, objective=objective, optimizer=optimizer,
        batches=batches, total_steps=warm.steps, run=folder, tokenizer=tokenizer, progress=progress,
        flops_per_token=flops_per_token(model.config, warm.seq_len, 0), peak_flops=peak_flops(world.device),
        evaluate=validation(objective, val, cfg.precision.compute, world),
        trainer_state={"stage": WARMUP_STAGE, "start": str(start), "preset": cfg.name, "total_steps": warm.steps,
                       "cycle": cycle},
    )
    progress.note(f"cycle {cycle}: warmup SFT on the teachers' replies ({chat.train.stats.samples} samples)")
    run_loop(job, start_step)
    world.barrier()
    return _newest_step(folder)[1]


def _teacher_replies(cfg: RunConfig, cycle: int, teachers: dict[str, Teacher], envs: dict[str, Environment],
                     data: Path, progress: Progress) -> None:
    """Each teacher's replies to md.warmup_prompts training prompts of its domain, the ones its environment passes,
    as chat rows in data/DOMAIN.jsonl (a `done` file marks the set complete)."""
    md = cfg.mopd
    data.mkdir(parents=True, exist_ok=True)
    for name, env in envs.items():
        prompts = env.prompts("train", md.warmup_prompts, stage_seed(f"{WARMUP_STAGE}-{cycle}", md.train.seed))
        progress.note(f"the {name} teacher answers {len(prompts)} prompts for the warmup")
        replies = teachers[name].backend.rollout(
            [p.messages for p in prompts], md.max_tokens, n=1, temperature=md.temperature, top_p=md.top_p,
            top_k=md.top_k, max_thinking_tokens=md.max_thinking_tokens or None,
            seed=step_seed(md.train.seed, -cycle, 0), enable_thinking=md.reasoning)
        groups = score_groups(lambda env_name, d, text: envs[env_name].score(d, text), [name] * len(prompts),
                              [p.data for p in prompts], replies, md.sandbox_workers)
        rows = [{"messages": p.messages + [_assistant(g[0].rollout)]}
                for p, g in zip(prompts, groups) if g[0].score.passed and not g[0].score.error]
        if not rows:
            raise UserError(f"the {name} teacher passed none of {len(prompts)} warmup prompts: nothing to warm up on")
        write_jsonl(data / f"{name}.jsonl", rows)
        progress.note(f"{name}: {len(rows)} of {len(prompts)} teacher replies pass")
    write_text(data / "done", "")


def _assistant(rollout) -> dict:
    turn = {"role": "assistant", "content": rollout.content}
    if rollout.reasoning is not None:
        turn["reasoning_content"] = rollout.reasoning
    return turn


# --- distillation ---------------------------------------------------------------------------------------------------
def _distill(cfg: RunConfig, cycle: int, start: Path, teachers: dict[str, Teacher], envs: dict[str, Environment],
             run: Path, tokenizer: Tokenizer, world: World, progress: Progress) -> dict | None:
    """Cycle `cycle`'s distillation: global steps ((cycle - 1) D, cycle D] of D = mopd.train.steps, from `start`
    (the warmup's output) or, when the run holds a checkpoint inside the cycle, from that one. Returns the last
    step's record (None when a resumed run had finished the cycle)."""
    md, train = cfg.mopd, cfg.mopd.train
    first, last = (cycle - 1) * train.steps, cycle * train.steps
    done = _newest_step(run)
    if done is not None and done[0] >= last:
        return None
    resumed = done if done is not None and done[0] > first and stage_of(done[1]) == STAGE else None
    source = resumed[1] if resumed else start
    torch.manual_seed(train.seed + cycle)
    model = from_pretrained(source, dtype=torch.float32, device=world.device)
    objective = distributed.prepare_model(PolicyObjective(model), cfg, world, progress.note, train)
    optimizer = build_optimizer(objective, train)
    step0 = first
    if resumed:
        step0 = load_checkpoint(resumed[1], objective, optimizer, world)["step"]
        progress.note(f"resuming {run} from step {step0} ({resumed[1].name})")
    plan = cycle_prompts(cfg, envs, cycle)
    context = rollout_context([p.messages for p in plan], tokenizer, md.max_tokens, train.seq_len,
                              enable_thinking=md.reasoning)
    backend = engine_backend(source, cfg, progress.note, max_len=context, max_batch=md.engine_batch)
    distiller = Distiller(cfg, envs, teachers, backend, objective, optimizer, world, run, tokenizer, start, first,
                           step0, plan)
    log = MetricsLog(run / "metrics.jsonl", resume_step=step0 or None) if world.is_main else None
    progress.start(f"cycle {cycle}: distillation", total=last - first, completed=step0 - first)
    record = None
    threads = None
    if md.asynchronous and world.device.type == "cpu":
        threads = md.stage_threads or max(1, torch.get_num_threads() // 2)
    for record in run_pipeline(range(step0, last), distiller.generate, distiller.score, distiller.learn,
                               md.max_staleness, md.asynchronous, threads):
        if log is not None:
            log.write(record | {"cycle": cycle})
        distiller.checkpoint(record["step"])
        progress.advance(1, reverse_kl=record["reverse_kl"], seconds=record["seconds"]["step"])
    world.barrier()
    return record


def cycle_prompts(cfg: RunConfig, envs: dict[str, Environment], cycle: int) -> list:
    """Cycle `cycle`'s distillation prompts, mopd.prompts_per_step for each of its steps: a seeded blend of the
    domains' training prompts, another for every cycle."""
    md = cfg.mopd
    return blend_prompts(envs, md.weights, md.prompts_per_step * md.train.steps, "train",
                         stage_seed(STAGE, md.train.seed) + cycle)


class Distiller:
    """The three stages of a distillation step (generate, score, learn) over shared state: the rollout engine and
    the mailbox of published weights (generator's side), the teachers (scorer's), the objective (learner's)."""

    def __init__(self, cfg, envs, teachers, backend: Backend, objective, optimizer, world: World, run: Path,
                 tokenizer: Tokenizer, start: Path, first: int, step0: int, plan: list):
        self.cfg, self.envs, self.teachers, self.backend = cfg, envs, teachers, backend
        self.objective, self.optimizer, self.world, self.run = objective, optimizer, world, run
        self.tokenizer, self.start, self.first, self.plan = tokenizer, start, first, plan
        self.mailbox, self.version = Mailbox(), step0
        self.sampling = Sampling(cfg.mopd.temperature, cfg.mopd.top_k, cfg.mopd.top_p)
        self.last_record_at = time.perf_counter()

    def generate(self, step: int):
        md, tick = self.cfg.mopd, time.perf_counter()
        published = self.mailbox.take()
        if published is not None:
            self.version = published[0]
            load_policy(self.backend, published[1], self.version)
        n = md.prompts_per_step
        i = step - self.first
        prompts = self.plan[i * n : (i + 1) * n][self.world.rank :: self.world.size]
        rollouts = self.backend.rollout(
            [p.messages for p in prompts], md.max_tokens, n=md.group_size, temperature=md.temperature,
            top_p=md.top_p, top_k=md.top_k, max_thinking_tokens=md.max_thinking_tokens or None,
            seed=step_seed(md.train.seed, step, self.world.rank), enable_thinking=md.reasoning,
        ) if prompts else []
        return self.version, (prompts, rollouts, time.perf_counter() - tick)

    def score(self, step: int, generated):
        md, tick = self.cfg.mopd, time.perf_counter()
        prompts, rollouts, generate_seconds = generated
        groups = score_groups(lambda env, data, text: self.envs[env].score(data, text), [p.env for p in prompts],
                              [p.data for p in prompts], rollouts, md.sandbox_workers)
        samples = [s for group in groups for s in group if not s.score.error]
        errors = sum(len(g) for g in groups) - len(samples)
        kept, per_env = [], {}
        for name in self.envs:
            mine = [s for s in samples if s.env == name]
            if not mine:
                continue
            teacher = self.teachers[name].logprobs([(s.rollout.prompt_ids, s.rollout.token_ids) for s in mine])
            outcome = outcome_advantages(torch.tensor([s.score.reward for s in mine]), md.orm_weight).tolist()
            row = per_env[name] = dict.fromkeys(("samples", *MEANS, "kl", "kl_tokens"), 0.0)
            for s, t, advantage in zip(mine, teacher, outcome):
                r = s.rollout
                trained = [not f for f in r.forced]
                kept.append(Trajectory(r.prompt_ids, r.token_ids, r.logprobs, trained, advantage, name, s.group,
                                       teacher_logp=t))
                row["samples"] += 1
                row["reward"] += s.score.reward
                row["accuracy"] += float(s.score.passed)
                row["length"] += len(r.token_ids)
                # KL(student || teacher) per token, from the student's samples: mean of log pi_behav - log pi_T.
                row["kl"] += sum(b - lt for b, lt, keep in zip(r.logprobs, t, trained) if keep)
                row["kl_tokens"] += sum(trained)
        return kept, per_env, errors, {"generate": generate_seconds, "score": time.perf_counter() - tick}

    def learn(self, step: int, version: int, scored) -> dict:
        md, train, world = self.cfg.mopd, self.cfg.mopd.train, self.world
        kept, per_env, errors, times = scored
        tick = time.perf_counter()
        micro_batches = rank_micro_batches(kept, "token", train.seq_len, train.micro_batch_size, world,
                                           self.tokenizer.pad_id or 0, teacher=True)
        lr = wsd_lr(step, md.cycles * train.steps, train)
        set_lr(self.optimizer, lr)
        losses = PolicyLossSettings(md.clip, md.clip, md.behaviour_cap, 0.0, md.behaviour_correction)
        update, load = accumulate_policy_gradients(self.objective, micro_batches, self.sampling, losses,
                                                   self.cfg.precision.compute, world)
        update["grad_norm"] = apply_gradients(self.objective, self.optimizer, train, load)
        done = step + 1
        self.mailbox.put(done, policy_weights(self.objective, self.backend, self.run / "rollout-weights", done,
                                              copy=md.asynchronous))
        times["update"] = time.perf_counter() - tick
        now = time.perf_counter()
        times["step"], self.last_record_at = now - self.last_record_at, now
        return _record(done, per_env, errors, update, lr, times, world)


    def checkpoint(self, done: int) -> None:
        """After step `done`'s record is logged (a run killed after its checkpoint has its metrics line too)."""
        md, train = self.cfg.mopd, self.cfg.mopd.train
        if done % train.checkpoint_interval == 0 or done % train.steps == 0:
            state = {"stage": STAGE, "start": str(self.start), "preset": self.cfg.name,
                     "total_steps": md.cycles * train.steps, "cycle": (done - 1) // train.steps + 1}
            save_checkpoint(self.run, done, self.objective, self.optimizer, state, self.tokenizer, self.world,
                            keep=train.keep_checkpoints)


def _record(step: int, per_env: dict, errors: int, update: dict, lr: float, times: dict, world: World) -> dict:
    """The step's metrics.jsonl line, over every rank's samples."""
    means = gather_env_means(per_env, world)
    generated = world.all_reduce(torch.tensor([float(sum(row["length"] * row["samples"] for row in means.values())),
                                               float(errors)]))
    return {
        "step": step,
        **{f"{key}/{env}": row[key] for env, row in means.items() for key in MEANS},
        **{f"reverse_kl/{env}": row["kl"] / max(1.0, row["kl_tokens"]) for env, row in means.items()},
        "dropped_errors": int(generated[1].item()),
        **update,
        "lr": lr,
        "generated_tokens": int(generated[0].item()),
        "tokens_per_s": generated[0].item() / max(1e-9, times["step"]),
        "seconds": times,
    }


def _newest_step(folder: Path) -> tuple[int, Path] | None:
    """(step, path) of a run folder's newest complete checkpoint, or None."""
    steps = run_checkpoints(folder)
    return (int(steps[-1].name.removeprefix("step-")), steps[-1]) if steps else None
