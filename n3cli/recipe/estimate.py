"""A rough time for a step before it runs, from its work and the preset's machines.

The work comes from the step's resolved preset (`Work`): FLOPs trained, tokens generated and the decode steps that
generate them, tokens scored forward only, programs run in the code sandbox, decode graphs compiled. Speed: the
preset's devices at their peak (a GPU's datasheet bf16 figure; a CPU's fp32 matmul rate, measured now). Training
and scoring run at TRAIN_SHARE of the peak; a generated token costs the larger of DECODE_TOKEN_SECONDS (the engine's
per-sequence work: sampling, the cache, scheduling) and its FLOPs at DECODE_SHARE of the peak; a decode step costs
DECODE_STEP_SECONDS on top whatever its batch, a sandboxed program PROGRAM_SECONDS, a compiled decode graph
COMPILE_SECONDS, every command STARTUP_SECONDS (imports, loading). Decode steps: a held-out evaluation runs each
domain and mode as one batch for as many steps as its longest reply; rollouts keep up to the engine's batch of
sequences in flight; acceptance timings decode one sequence at a time. Replies average REPLY_SHARE of max_tokens.

The constants are fitted (least relative error) to the tiny recipe's steps measured on two idle CPU cores
(benchmarks/RESULTS.md), where every step's estimate lands within 2x of its time (tests/test_recipe.py); there
decoding is bound by per-token overheads, not FLOPs, so DECODE_SHARE is a guess for GPU presets, not a fit. A step
that ran before is reported with its measured time instead.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from model.config import ModelConfig
from presets.schema import RunConfig, TrainConfig
from stages.runtime.metrics import GPU_PEAK_TFLOPS, flops_per_token, peak_flops

TRAIN_SHARE = 0.75
DECODE_SHARE = 0.2
DECODE_TOKEN_SECONDS = 2.5e-4
DECODE_STEP_SECONDS = 7e-4
PROGRAM_SECONDS = 0.025
COMPILE_SECONDS = 8.5
STARTUP_SECONDS = 5.5
REPLY_SHARE = 0.25
DOMAINS = 3  # the built-in task domains (math, code, instructions)
MODES = 2  # reasoning on and off


@dataclass
class Work:
    trained: float = 0.0
    """Training FLOPs."""
    generated: float = 0.0
    """Tokens generated."""
    decode_steps: float = 0.0
    """Decode steps those tokens take (on one device)."""
    scored: float = 0.0
    """Tokens run forward only."""
    programs: float = 0.0
    """Replies run in the code sandbox."""
    compiles: float = 0.0
    """Decode graphs the engine compiles (one per draft depth it runs)."""

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __mul__(self, times: float) -> Work:
        return Work(*(a * times for a in astuple(self)))


def estimate_seconds(stage: str, cfg: RunConfig, kind: str = "", options: dict | None = None) -> float | None:
    """Seconds the stage takes under `cfg` on the preset's machines (`kind`: an eval step's kind, or the domain of
    an rlvr teacher; `options`: the command's options); None where the preset's devices are not known."""
    devices = cfg.parallel.nodes * cfg.parallel.gpus_per_node
    peak = _device_peak(cfg)
    if peak is None or stage == "data":  # data: tokenizer training and tokenizing, not model FLOPs
        return None
    work = work_of(stage, cfg, kind, options or {})
    active = _active_parameters(cfg.model)
    flops = (work.trained + 2 * active * work.scored) / (TRAIN_SHARE * peak)
    per_token = max(DECODE_TOKEN_SECONDS, 2 * active / (DECODE_SHARE * peak))
    overheads = (work.decode_steps * DECODE_STEP_SECONDS + work.generated * per_token
                 + work.programs * PROGRAM_SECONDS + work.compiles * COMPILE_SECONDS)
    return STARTUP_SECONDS + (flops + overheads) / devices


def _device_peak(cfg: RunConfig) -> float | None:
    import torch

    if cfg.parallel.strategy == "none" and cfg.precision.compute == "fp32":  # the cpu preset: this machine
        return peak_flops(torch.device("cpu"))
    name = cfg.name.upper()
    return next((t * 1e12 for part, t in sorted(GPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if part in name), None)


def _active_parameters(model: ModelConfig) -> float:
    return flops_per_token(model, 1, 0) / 6.0


def _train_flops(model: ModelConfig, train: TrainConfig, tokens: float | None = None) -> float:
    tokens = tokens if tokens is not None else (train.tokens or train.steps * train.global_batch_size * train.seq_len)
    return tokens * flops_per_token(model, train.seq_len, train.mtp_depths)


def _evaluation(problems: int, max_tokens: int, domains: tuple[str, ...] = ("math", "code", "instructions")
                ) -> Work:
    """One held-out evaluation: every domain in both reasoning modes, each a batch of `problems` decoded for as
    many steps as its longest reply, at the cost of every reply running that long (measured: a held-out batch
    costs about four times what its mean reply length says)."""
    batches = len(domains) * MODES
    return Work(generated=batches * problems * max_tokens, decode_steps=batches * max_tokens,
                programs=MODES * problems * ("code" in domains))


def _rollouts(sequences: float, max_tokens: int, engine_batch: int, in_flight: float, code_share: float) -> Work:
    """Replies of `sequences`, up to `in_flight` of them at a time (at most the engine's batch), `code_share` of
    them programs; scored once."""
    tokens = sequences * max_tokens * REPLY_SHARE
    return Work(generated=tokens, decode_steps=tokens / max(1, min(engine_batch, in_flight)), scored=tokens,
                programs=sequences * code_share)


def _acceptance(depth: int, temperatures: int, prompts: int, max_tokens: int) -> Work:
    """MTP acceptance as stages.eval.mtp.acceptance measures it: at each draft length and temperature one batched
    generation, counted, then decoding timed at batch 1 (a step per token): 2 prompts x 48 tokens, plain and
    speculative, three times."""
    runs = depth * temperatures
    timed = runs * 3 * 2 * 2 * min(48, max_tokens)
    return Work(generated=runs * prompts * max_tokens + timed, decode_steps=runs * max_tokens + timed,
                compiles=depth + 1)


def work_of(stage: str, cfg: RunConfig, kind: str = "", options: dict | None = None) -> Work:
    """The work of a stage under `cfg` (`kind` and `options` as estimate_seconds takes them)."""
    m = cfg.model
    if stage == "pretrain":
        return Work(trained=_train_flops(m, cfg.train), scored=cfg.train.eval_sequences * cfg.train.seq_len)
    if stage == "extend":
        e = cfg.extend
        scored = 2 * (e.eval_documents + e.eval_sequences) * e.train.seq_len
        ruler = 2 * 3 * e.ruler_samples * sum(e.ruler_lengths)  # three tasks, before and after: mostly prefill
        return Work(trained=_train_flops(m, e.train), scored=scored + ruler)
    if stage == "sft":
        s = cfg.sft
        return Work(trained=_train_flops(m, s.train)) + _evaluation(s.eval_problems, s.eval_max_tokens) * 2
    if stage == "rlvr":
        r = cfg.rlvr
        per_step = r.prompts_per_step * r.group_size
        domains = (kind,) if kind else tuple(r.envs)
        code = domains.count("code") / len(domains)
        rollouts = _rollouts(r.train.steps * per_step, r.max_tokens, r.engine_batch, per_step, code)
        evaluation = _evaluation(r.eval_problems, r.eval_max_tokens, domains) * 2  # before and after
        return Work(trained=_train_flops(m, r.train, rollouts.generated)) + rollouts + evaluation
    if stage == "mopd":
        d = cfg.mopd
        per_step = d.prompts_per_step * d.group_size
        rollouts = _rollouts(d.train.steps * per_step, d.max_tokens, d.engine_batch, per_step, 1 / DOMAINS)
        warmup = _rollouts(DOMAINS * d.warmup_prompts, d.max_tokens, d.engine_batch, d.warmup_prompts, 1 / DOMAINS)
        evaluation = _evaluation(d.eval_problems, d.eval_max_tokens) * 3  # before, after and the teachers
        learner = Work(trained=_train_flops(m, d.train, rollouts.generated) + _train_flops(m, d.warmup),
                       scored=rollouts.generated)  # the teachers' scores on top of the learner's proximal pass
        return (learner + rollouts + warmup + evaluation) * d.cycles
    if stage == "mtp-boost":
        b = cfg.mtp_boost
        replies = _rollouts(b.prompts, b.max_tokens, b.engine_batch, b.prompts, 0.0)  # not scored: no programs
        acceptance = _acceptance(b.train.mtp_depths, 2, b.eval_prompts, b.eval_max_tokens) * 2  # before, after
        return Work(trained=_train_flops(m, b.train)) + replies + acceptance
    if stage == "quantize":
        return Work(scored=4 * 8192 * 4)  # calibration, sensitivity and quality passes over 8,192-token sets
    return _eval_work(cfg, kind, options or {})


def _eval_work(cfg: RunConfig, kind: str, options: dict) -> Work:
    """An `n3 eval` command's work at its CPU defaults, or the options the recipe gives it."""
    from stages.eval.lengths import parse_lengths

    if kind == "tasks":
        return _evaluation(options.get("samples", cfg.sft.eval_problems),
                           options.get("max_tokens", cfg.sft.eval_max_tokens))
    if kind == "mtp":
        return _acceptance(options.get("depth", 3), len(options.get("temperature", [0.0, 1.0])),
                           options.get("prompts", 16), options.get("max_tokens", 128))
    if kind == "ruler":  # 13 tasks; the prompts are scored, the answers short
        lengths = parse_lengths(options.get("lengths", "1k,2k"))
        samples = 13 * options.get("samples", 5)
        return Work(generated=samples * 64 * len(lengths), decode_steps=samples * 64 * len(lengths),
                    scored=samples * sum(lengths))
    return Work(scored=options.get("max_tokens", 1 << 16))  # perplexity
