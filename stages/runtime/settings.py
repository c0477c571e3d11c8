"""What a preset decides for any stage that runs a model: kernel backends, the weights' dtype, and the inference
engine (its [serve] table). One place, so pretrain, serve and eval read a preset the same way.

    configure_kernels(cfg)                                     # the [kernels] table, before building a model
    checkpoint, model_cfg = open_checkpoint(path, "n3 serve")  # resolved and checked, nothing loaded
    engine = load_engine(checkpoint, cfg, engine_config(cfg, max_len=4096), warn=log.warning)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from model.errors import UserError
from model.tokenizer import Tokenizer
from presets.schema import RunConfig


def configure_kernels(cfg: RunConfig) -> None:
    """Apply the preset's [kernels] table; a fast path that is asked for by name but missing is a UserError."""
    import kernels

    try:
        kernels.configure(**vars(cfg.kernels))
    except ValueError as err:
        raise UserError(f"preset {cfg.name}: {err}") from None


def weight_dtype(cfg: RunConfig):
    """The torch dtype serve.dtype names, or None for "auto" (the checkpoint's own)."""
    from stages.runtime.distributed import DTYPES

    return None if cfg.serve.dtype == "auto" else DTYPES[cfg.serve.dtype]


def engine_config(
    cfg: RunConfig,
    max_len: int | None = None,
    max_batch: int | None = None,
    speculative_tokens: int | None = None,
    prefill_tokens: int | None = None,
    compile: bool | None = None,
):
    """model.engine.EngineConfig from the preset's [serve] table, with a caller's own context, batch, speculation,
    prompt tokens per step (beyond the decodes) or decode compilation where it sets them; serve.max_step_tokens, when
    set, wins."""
    from model.engine import EngineConfig

    s = cfg.serve
    batch = max_batch or s.max_batch
    drafts = s.speculative_tokens if speculative_tokens is None else speculative_tokens
    step_tokens = s.max_step_tokens or (batch * (1 + drafts) + prefill_tokens if prefill_tokens else None)
    try:
        return EngineConfig(
            max_batch=batch, max_len=max_len or s.max_len or None, max_step_tokens=step_tokens,
            speculative_tokens=drafts, ssm_dtype=s.ssm_cache_dtype, stochastic_rounding=s.ssm_stochastic_rounding,
            compile=s.compile if compile is None else compile,
        )
    except ValueError as err:
        raise UserError(f"preset {cfg.name}: serve: {err}") from None


def open_checkpoint(path: Path, user: str, speculative_tokens: int = 0):
    """The checkpoint a path names (a run folder resolves to its newest) and its model.config.ModelConfig, checked
    for what an engine needs: a tokenizer, and an MTP head when it drafts. `user` names the command in errors."""
    from model.checkpoint import config_from_hf, read_config, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    model_cfg = config_from_hf(read_config(checkpoint))
    if not (checkpoint / "tokenizer.json").is_file():
        raise UserError(f"{checkpoint} has no tokenizer.json; {user} needs the tokenizer saved with the checkpoint")
    if speculative_tokens and not model_cfg.mtp_pattern:
        raise UserError(f"serve.speculative_tokens = {speculative_tokens} but {checkpoint} has no MTP head to draft "
                        "with; set serve.speculative_tokens=0")
    return checkpoint, model_cfg


def load_engine(checkpoint: Path, cfg: RunConfig, config, warn: Callable[[str], None]):
    """Weights (in serve.dtype, on the GPU when there is one), tokenizer and engine for a checked checkpoint. A compiled
    decode step is compiled here; if compilation fails (on CPU it needs a C++ compiler) `warn` is told and the engine
    decodes eagerly."""
    import torch

    from model.checkpoint import from_pretrained
    from model.engine import Engine
    from model.tokenizer import Tokenizer

    configure_kernels(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(checkpoint, dtype=weight_dtype(cfg), device=device)
    tokenizer = Tokenizer.load(checkpoint)
    engine = Engine(model, tokenizer, config)
    if config.compile:
        try:
            engine.warm_up()
        except Exception as err:  # torch.compile fails in many ways (no compiler, unsupported op): never fatal
            warn(f"compiling the decode step failed ({' '.join(str(err).split())[:300]}); decoding eagerly")
            engine = Engine(model, tokenizer, dataclasses.replace(config, compile=False))
    return engine


def chat_tokenizer(checkpoint: Path, command: str) -> Tokenizer:
    """The checkpoint's tokenizer, which must carry a chat template: the stages that train on conversations work
    in the checkpoint's own template (UserError otherwise, naming `command`)."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise UserError(f"{checkpoint} has no tokenizer.json; {command} needs the checkpoint's tokenizer and chat "
                        "template")
    tokenizer = Tokenizer.load(checkpoint)
    if tokenizer.chat_template is None:
        raise UserError(f"{checkpoint}'s tokenizer has no chat template (tokenizer_config.json chat_template or "
                        f"chat_template.jinja); {command} works in the checkpoint's own template")
    return tokenizer
