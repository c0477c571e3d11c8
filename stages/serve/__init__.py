"""`n3 serve`: an OpenAI-compatible HTTP server over the inference engine (REFERENCE.md section 5).

    plan = plan_serve(checkpoint, cfg)   # checks the checkpoint and the [serve] preset table, loads nothing
    serve(plan, host, port)              # blocks until SIGINT / SIGTERM, then finishes the requests in flight
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from presets.schema import RunConfig

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class ServePlan:
    checkpoint: Path
    """The checkpoint directory (a run folder resolved to its newest checkpoint)."""
    model_name: str
    """What /v1/models lists and requests name: the run's or the checkpoint's directory name."""
    config: RunConfig
    engine: object
    """model.engine.EngineConfig built from the preset's [serve] table."""
    model: object
    """The checkpoint's model.config.ModelConfig."""
    dtype: str
    """Weights and activations dtype: the preset's serve.dtype, or the checkpoint's own."""
    weight_bytes: int
    cache_bytes: int
    """KV, Mamba state and MTP caches for every request slot, preallocated at start."""


def plan_serve(path: Path, cfg: RunConfig) -> ServePlan:
    """Resolve and check what `n3 serve` would load, without loading weights: UserError for a missing or malformed
    checkpoint, a checkpoint without a tokenizer, or [serve] values the engine refuses."""
    from model.checkpoint import config_from_hf, read_config, resolve_checkpoint
    from model.engine import EngineConfig

    checkpoint = resolve_checkpoint(path)
    model_cfg = config_from_hf(read_config(checkpoint))
    if not (checkpoint / "tokenizer.json").is_file():
        raise UserError(f"{checkpoint} has no tokenizer.json; n3 serve needs the tokenizer saved with the checkpoint")
    s = cfg.serve
    try:
        engine = EngineConfig(
            max_batch=s.max_batch, max_len=s.max_len or None, max_step_tokens=s.max_step_tokens or None,
            speculative_tokens=s.speculative_tokens, ssm_dtype=s.ssm_cache_dtype,
            stochastic_rounding=s.ssm_stochastic_rounding,
        )
    except ValueError as err:
        raise UserError(f"preset {cfg.name}: serve: {err}") from None
    if engine.speculative_tokens and not model_cfg.mtp_pattern:
        raise UserError(f"serve.speculative_tokens = {engine.speculative_tokens} but {checkpoint} has no MTP head; "
                        "set serve.speculative_tokens=0")
    name = path.resolve().name if (path / "checkpoints").is_dir() else checkpoint.resolve().name
    weight_bytes, cache_bytes, dtype = _memory(model_cfg, engine, read_config(checkpoint), s.dtype)
    return ServePlan(checkpoint, name, cfg, engine, model_cfg, dtype, weight_bytes, cache_bytes)


def _memory(model_cfg, engine, hf: dict, dtype: str) -> tuple[int, int, str]:
    """Bytes of weights and of the engine's caches, from shapes alone (built on the meta device)."""
    import torch

    from model.cache import HybridCache
    from model.checkpoint import DTYPES as CHECKPOINT_DTYPES
    from model.hybrid import build

    if dtype == "auto":
        stored = CHECKPOINT_DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), torch.float32)
        dtype = {v: k for k, v in DTYPES.items()}.get(str(stored).removeprefix("torch."), "fp32")
    torch_dtype = getattr(torch, DTYPES[dtype])
    model = build(model_cfg, device="meta", dtype=torch_dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    room = (engine.max_len or model_cfg.max_position_embeddings) + engine.speculative_tokens + 1
    ssm = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[engine.ssm_dtype]
    caches = [HybridCache(model_cfg, engine.max_batch, room, torch_dtype, "meta", ssm)]
    if engine.speculative_tokens:
        caches.append(HybridCache(model_cfg, engine.max_batch, room, torch_dtype, "meta", pattern=model_cfg.mtp_pattern))
    return weights, sum(c.nbytes() for c in caches), dtype


def load_engine(plan: ServePlan):
    """Weights, tokenizer and engine for a plan (the slow part: runs after the HTTP server is up)."""
    import torch

    import kernels
    from model.checkpoint import from_pretrained
    from model.engine import Engine
    from model.tokenizer import Tokenizer

    kernels.configure(**vars(plan.config.kernels))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[plan.config.serve.dtype]) if plan.config.serve.dtype != "auto" else None
    model = from_pretrained(plan.checkpoint, dtype=dtype, device=device)
    return Engine(model, Tokenizer.load(plan.checkpoint), plan.engine)


def serve(plan: ServePlan, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted. Loading errors stop the server and come back as a UserError."""
    import uvicorn

    from stages.serve.app import Server, build_app

    server = Server(plan.model_name, lambda: load_engine(plan))
    http = uvicorn.Server(uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level))

    def stop_http() -> None:
        http.should_exit = True

    server.on_failure = stop_http
    try:
        listener = socket.create_server((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    http.run(sockets=[listener])
    if server.status == "failed":
        raise UserError(f"could not load {plan.checkpoint}: {server.error}")
