"""A rough time for a step before it runs: the model FLOPs of its work over the preset's machines' speed.

The work comes from the step's resolved preset: tokens trained (forward and backward), tokens generated (replies
and evaluations, two FLOPs per active parameter each) and tokens scored (forward only). Speed: the preset's devices
at their peak (a GPU's datasheet bf16 figure; a CPU's fp32 matmul rate, measured now) times what runs reach on them:
TRAIN_SHARE of the peak in training (the cpu preset's `n3 pretrain` reports 0.43 MFU; large GPU runs 0.3-0.45) and
DECODE_SHARE in generation, which is bound by memory and per-token overhead, not FLOPs. Replies are taken at
REPLY_SHARE of their max_tokens (the built-in tasks' replies: 40-70 tokens of 256). Expect a factor of two either
way; a step that ran before is reported with its measured time instead.
"""

from __future__ import annotations

from model.config import ModelConfig
from presets.schema import RunConfig, TrainConfig
from stages.runtime.metrics import GPU_PEAK_TFLOPS, flops_per_token, peak_flops

TRAIN_SHARE = 0.4
DECODE_SHARE = 0.05
REPLY_SHARE = 0.25
DOMAINS = 3  # the built-in task domains an evaluation covers (math, code, instructions)
MODES = 2  # reasoning on and off


def estimate_seconds(stage: str, cfg: RunConfig, kind: str = "", options: dict | None = None) -> float | None:
    """Seconds the stage (an eval step: its `kind` and command options) takes under `cfg` on the preset's
    machines; None where the preset's devices are not known."""
    devices = cfg.parallel.nodes * cfg.parallel.gpus_per_node
    peak = _device_peak(cfg)
    if peak is None or stage == "data":  # data: tokenizer training and tokenizing, not model FLOPs
        return None
    trained, generated, scored = _work(stage, cfg, kind, options or {})
    active = _active_parameters(cfg.model)
    return (trained / (TRAIN_SHARE * peak) + (2 * active * generated) / (DECODE_SHARE * peak)
            + (2 * active * scored) / (TRAIN_SHARE * peak)) / devices


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


def _tasks_eval(problems: int, max_tokens: int) -> float:
    """Tokens one held-out evaluation generates: every domain, both reasoning modes."""
    return DOMAINS * MODES * problems * max_tokens * REPLY_SHARE


def _work(stage: str, cfg: RunConfig, kind: str, options: dict) -> tuple[float, float, float]:
    """(training FLOPs, tokens generated, tokens scored forward-only)."""
    m = cfg.model
    if stage == "pretrain":
        return _train_flops(m, cfg.train), 0.0, cfg.train.eval_sequences * cfg.train.seq_len
    if stage == "extend":
        e = cfg.extend
        scored = 2 * (e.eval_documents + e.eval_sequences) * e.train.seq_len
        ruler = 2 * 3 * e.ruler_samples * sum(e.ruler_lengths)  # three tasks, before and after: mostly prefill
        return _train_flops(m, e.train), 0.0, scored + ruler
    if stage == "sft":
        s = cfg.sft
        return _train_flops(m, s.train), 2 * _tasks_eval(s.eval_problems, s.eval_max_tokens), 0.0
    if stage == "rlvr":
        r = cfg.rlvr
        replies = r.train.steps * r.prompts_per_step * r.group_size * r.max_tokens * REPLY_SHARE
        # one domain per teacher run: its evaluation covers a third of the suite
        evaluation = 2 * _tasks_eval(r.eval_problems, r.eval_max_tokens) / DOMAINS
        return _train_flops(m, r.train, replies), replies + evaluation, replies
    if stage == "mopd":
        d = cfg.mopd
        replies = d.train.steps * d.prompts_per_step * d.group_size * d.max_tokens * REPLY_SHARE
        warmup = DOMAINS * d.warmup_prompts * d.max_tokens * REPLY_SHARE
        evaluation = 3 * _tasks_eval(d.eval_problems, d.eval_max_tokens)  # before, after and the teachers
        per_cycle = (_train_flops(m, d.train, replies) + _train_flops(m, d.warmup), replies + warmup + evaluation,
                     2 * replies)  # the learner's proximal log-probs and the teachers' scores
        return tuple(d.cycles * x for x in per_cycle)
    if stage == "mtp-boost":
        b = cfg.mtp_boost
        replies = b.prompts * b.max_tokens * REPLY_SHARE
        acceptance = 2 * 2 * b.train.mtp_depths * b.eval_prompts * b.eval_max_tokens  # before/after, two temperatures
        return _train_flops(m, b.train), replies + acceptance, 0.0
    if stage == "quantize":
        return 0.0, 0.0, 4 * 8192 * 4  # calibration, sensitivity and quality passes over 8,192-token sets
    return _eval_work(cfg, kind, options)


def _eval_work(cfg: RunConfig, kind: str, options: dict) -> tuple[float, float, float]:
    """An `n3 eval` command's work at its CPU defaults, or the options the recipe gives it."""
    from stages.eval.lengths import parse_lengths

    if kind == "tasks":
        return 0.0, _tasks_eval(options.get("samples", cfg.sft.eval_problems),
                                options.get("max_tokens", cfg.sft.eval_max_tokens)), 0.0
    if kind == "mtp":  # plain decoding and every draft length, at each temperature
        runs = (1 + options.get("depth", 3)) * len(options.get("temperature", [0.0, 1.0]))
        return 0.0, runs * options.get("prompts", 16) * options.get("max_tokens", 128), 0.0
    if kind == "ruler":  # 13 tasks; the prompts are scored, the answers short
        lengths = parse_lengths(options.get("lengths", "1k,2k"))
        samples = 13 * options.get("samples", 5)
        return 0.0, samples * 64 * len(lengths), samples * sum(lengths)
    return 0.0, 0.0, options.get("max_tokens", 1 << 16)  # perplexity
