"""`n3 serve`: an OpenAI-compatible HTTP server over the inference engine (REFERENCE.md section 5).

    plan = plan_serve(checkpoint, cfg)   # checks the checkpoint and the [serve] preset table, loads nothing
    serve(plan, host, port)              # blocks until SIGINT / SIGTERM, then finishes the requests in flight
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from presets.schema import RunConfig
from stages.runtime.settings import engine_config, load_engine, open_checkpoint, weight_dtype


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
    """Weights and activations dtype (a torch name, e.g. bfloat16): the preset's serve.dtype, or the checkpoint's
    own (float32 when its config.json names none)."""
    weight_bytes: int
    cache_bytes: int
    """KV, Mamba state and MTP caches for every request slot, preallocated at start."""

    def load(self):
        """Weights, tokenizer and engine (the slow part: runs after the HTTP server is up); a failed compilation of
        the decode step is logged and the engine decodes eagerly."""
        return load_engine(self.checkpoint, self.config, self.engine, logging.getLogger("uvicorn.error").warning)


def plan_serve(path: Path, cfg: RunConfig) -> ServePlan:
    """Resolve and check what `n3 serve` would load, without loading weights: UserError for a missing or malformed
    checkpoint, a checkpoint without a tokenizer, or [serve] values the engine refuses."""
    import torch

    from model.checkpoint import read_config, stored_dtype

    engine = engine_config(cfg)
    checkpoint, model_cfg = open_checkpoint(path, "n3 serve", engine.speculative_tokens)
    name = path.resolve().name if (path / "checkpoints").is_dir() else checkpoint.resolve().name
    dtype = weight_dtype(cfg) or stored_dtype(read_config(checkpoint)) or torch.float32
    weight_bytes, cache_bytes = _memory(model_cfg, engine, dtype)
    dtype = str(dtype).removeprefix("torch.")
    return ServePlan(checkpoint, name, cfg, engine, model_cfg, dtype, weight_bytes, cache_bytes)


def _memory(model_cfg, engine, dtype) -> tuple[int, int]:
    """Bytes of weights in `dtype` and of the engine's caches, from shapes alone (built on the meta device)."""
    from model.cache import HybridCache
    from model.engine.engine import SSM_DTYPES
    from model.hybrid import build

    model = build(model_cfg, device="meta", dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    room = (engine.max_len or model_cfg.max_position_embeddings) + engine.speculative_tokens + 1
    caches = [HybridCache(model_cfg, engine.max_batch, room, dtype, "meta", SSM_DTYPES[engine.ssm_dtype])]
    if engine.speculative_tokens:
        caches.append(HybridCache(model_cfg, engine.max_batch, room, dtype, "meta", pattern=model_cfg.mtp_pattern))
    return weights, sum(c.nbytes() for c in caches)


def serve(plan: ServePlan, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted. Loading errors stop the server and come back as a UserError."""
    import uvicorn

    from stages.serve.app import Server, build_app

    server = Server(plan.model_name, plan.load, plan.checkpoint)
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
