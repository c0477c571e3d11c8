"""The inference engine shared by serve, eval, rlvr, mopd and mtp-boost: continuous batching over a hybrid KV +
Mamba-state cache, chunked prefill, sampling with per-request seeds, logprobs (raw or of the sampling distribution),
stop strings, MTP self-speculation, reasoning control (forced tokens marked), and weights reloaded in place with a
version. See `Engine` for the API."""

from model.engine.engine import Engine, EngineStats, PromptTooLong
from model.engine.params import EngineConfig, SamplingParams
from model.engine.sampling import TokenLogprob
from model.engine.sequence import Completion, Delta

__all__ = [
    "Completion", "Delta", "Engine", "EngineConfig", "EngineStats", "PromptTooLong", "SamplingParams", "TokenLogprob",
]
