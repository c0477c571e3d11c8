"""`n3 eval throughput`: serving speed for fixed input/output shapes at a given concurrency: time to first token,
time per output token, inter-token latency and tokens per second, in-process or against an endpoint.

The default shapes are the Nemotron 3 report's (REFERENCE.md section 5): 8K input / 64K output and 50K input / 2K
output, divided by `scale` on small machines. Prompts are slices of the built-in corpus (real text: MoE routing and
MTP drafts behave as on real requests); outputs run to exactly the requested length, eos ignored.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from model.errors import UserError
from stages.eval.corpus import builtin_corpus
from stages.rollout.backend import Backend, Timing

REPORT_SHAPES = [(8192, 65536), (51200, 2048)]
"""(input, output) tokens: the report's 8K/64K and 50K/2K."""


@dataclass
class Shape:
    input_len: int
    output_len: int

    @property
    def label(self) -> str:
        return f"{self.input_len}/{self.output_len}"


def report_shapes(scale: int) -> list[Shape]:
    if scale < 1:
        raise UserError(f"--scale must be at least 1, got {scale}")
    return [Shape(max(1, i // scale), max(1, o // scale)) for i, o in REPORT_SHAPES]


@dataclass
class ThroughputResult:
    shape: Shape
    concurrency: int
    requests: int
    duration: float
    """Seconds from the first request sent to the last token received."""
    input_tokens: int
    output_tokens: int
    ttft: list[float]
    """Per request: seconds from sending to the first output."""
    tpot: list[float]
    """Per request: seconds per output token after the first."""
    itl: list[float]
    """Every gap between consecutive outputs of a request (a gap may carry several tokens)."""

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            if not values:
                return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
            v = np.asarray(values) * 1000
            return {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)),
                    "p99_ms": float(np.percentile(v, 99))}

        return {
            "input_len": self.shape.input_len, "output_len": self.shape.output_len, "concurrency": self.concurrency,
            "requests": self.requests, "duration_s": self.duration,
            "requests_per_s": self.requests / self.duration,
            "output_tokens_per_s": self.output_tokens / self.duration,
            "total_tokens_per_s": (self.input_tokens + self.output_tokens) / self.duration,
            "ttft": stats(self.ttft), "tpot": stats(self.tpot), "itl": stats(self.itl),
        }


def prompts(backend: Backend, input_len: int, count: int, seed: int) -> list[list[int]]:
    """count prompts of exactly input_len tokens: bos (if any), then corpus tokens from a random offset (wrapping)."""
    prefix = backend.encode("")
    body = backend.tokenizer.encode(builtin_corpus().text)
    need = input_len - len(prefix)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start = rng.randrange(len(body))
        out.append(prefix + (body[start:] + body * (need // len(body) + 1))[:need])
    return out


def measure(backend: Backend, shape: Shape, concurrency: int, requests: int, seed: int = 0,
            warmup: bool = True) -> ThroughputResult:
    """Run `requests` requests of the shape, `concurrency` at a time (after one short warm-up request)."""
    if concurrency < 1 or requests < 1:
        raise UserError("concurrency and requests must be at least 1")
    if backend.context is not None and shape.input_len + shape.output_len > backend.context:
        raise UserError(f"shape {shape.label} needs {shape.input_len + shape.output_len} tokens of context; the model "
                        f"is served with {backend.context} (use --scale or a shorter shape)")
    batch = prompts(backend, shape.input_len, requests, seed)
    if warmup:
        backend.timed(batch[:1], min(shape.output_len, 4), 1)
    start = time.perf_counter()
    timings = backend.timed(batch, shape.output_len, concurrency)
    end = max(t.arrivals[-1] if t.arrivals else t.sent for t in timings)
    return ThroughputResult(
        shape, concurrency, requests, end - start,
        sum(t.prompt_tokens for t in timings), sum(t.output_tokens for t in timings),
        [t.arrivals[0] - t.sent for t in timings if t.arrivals],
        [_tpot(t) for t in timings if t.output_tokens > 1 and len(t.arrivals) > 1],
        [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:])],
    )


def _tpot(t: Timing) -> float:
    return (t.arrivals[-1] - t.arrivals[0]) / (t.output_tokens - 1)
