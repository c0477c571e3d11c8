"""Training telemetry: MaxVio and residual norms per layer with their warnings, throughput and MFU, metrics.jsonl.

MaxVio of a MoE layer = max_i load_i / mean(load) over the global batch (REFERENCE.md section 1: about 1.2 when
healthy, spikes near 12 preceded divergence). Residual RMS = RMS of each sublayer's output (the residual stream).
MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token = 6 x (active matmul parameters, MTP depths and
their lm_head passes included) + 12 x seq_len x heads x head_dim per attention layer (the PaLM convention; the SSD scan
is not counted).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.hybrid import build
from model.params import count_parameters

# Dense bf16 peak TFLOP/s by the name CUDA reports (the parts the presets target, and their predecessors).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "GB200": 2500.0, "A100": 312.0}


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """load (layers, experts) -> MaxVio per layer."""
    return load.max(-1).values / load.mean(-1).clamp(min=1e-9)


def flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depths: int) -> float:
    """Training FLOPs (forward + backward) per token, main model plus the MTP depths trained."""
    counts = count_parameters(build(cfg, device="meta"))
    main_total, main_active = counts.without_mtp()
    main_active -= cfg.hidden_size  # the embedding lookup is not a matmul
    mtp = counts.by_block.get("mtp", (0, 0))[1] + counts.by_block["lm_head"][1]
    attention = cfg.main_pattern.count("*") + mtp_depths * cfg.mtp_pattern.count("*")
    return 6.0 * (main_active + mtp_depths * mtp) + 12.0 * attention * seq_len * cfg.num_attention_heads * cfg.head_dim


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured figure, the GPU's datasheet bf16 figure, or for a CPU the fp32
    matmul rate measured now (the best it does in practice). None for an unknown GPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, tflops in sorted(GPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
            if part in name:
                return tflops * 1e12
        return None
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(6):  # the best of several: a busy machine only ever makes a trial slower
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * n**3 / best


class Monitor:
    """Warns when a MoE layer's MaxVio passes its threshold, or a layer's residual RMS jumps past a multiple of its
    running average (an exponential average). Residual norms grow fast from initialisation, so their warnings wait
    until `settle_steps` have passed."""

    def __init__(self, maxvio_limit: float, residual_jump: float, settle_steps: int = 0, smoothing: float = 0.9):
        self.maxvio_limit, self.residual_jump, self.smoothing = maxvio_limit, residual_jump, smoothing
        self.settle_steps = settle_steps
        self.residual_average: list[float] | None = None

    def state_dict(self) -> dict:
        return {"residual_average": self.residual_average}

    def load_state_dict(self, state: dict) -> None:
        self.residual_average = state["residual_average"]

    def check(self, step: int, maxvio: list[float], residual_rms: list[float], moe_names: list[str]) -> list[str]:
        warnings = [
            f"step {step}: MaxVio {v:.2f} in MoE layer {name} (limit {self.maxvio_limit:g}): routing is collapsing"
            for name, v in zip(moe_names, maxvio) if v > self.maxvio_limit
        ]
        if self.residual_average is not None and step > self.settle_steps:
            for layer, (rms, average) in enumerate(zip(residual_rms, self.residual_average)):
                if rms > self.residual_jump * average:
                    warnings.append(
                        f"step {step}: residual RMS of layer {layer} jumped to {rms:.3g} "
                        f"({rms / average:.1f}x its running average): an early sign of divergence"
                    )
        if self.residual_average is None:
            self.residual_average = list(residual_rms)
        else:
            a = self.smoothing
            self.residual_average = [a * avg + (1 - a) * rms for avg, rms in zip(self.residual_average, residual_rms)]
        return warnings


class MetricsLog:
    """metrics.jsonl: one JSON object per line. Opening at a resumed step drops the lines written after it, so the
    file tells one history."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:  # a line cut short by a kill
        return float("inf")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Clock:
    """Wall time by part: lap(name) ends the part running since the last lap."""

    def __init__(self) -> None:
        self.first = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name], self.last = now - self.last, now

    def laps(self) -> dict[str, float]:
        return self.parts | {"total": self.last - self.first}
