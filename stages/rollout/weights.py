"""The learner's weights on their way to what generates its rollouts: in place into an in-process engine, or to a
server as a checkpoint folder it reloads (SGLang's /update_weights_from_disk contract).

    weights = policy_weights(objective, backend, run / "rollout-weights", version, copy=True)   # the learner's side
    load_policy(backend, weights, version)                                                      # the generator's side

The two halves may run on different threads (an asynchronous pipeline): `copy` snapshots the tensors so that the
learner may train on before the generator loads them, and server folders are per version, so that a server still
reading one is not disturbed by the next.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model.checkpoint import save_pretrained
from stages.rollout.backend import Backend
from stages.rollout.client import EndpointBackend
from stages.runtime import distributed

KEEP_FOLDERS = 2
"""Server weight folders kept: the newest, and the one before, which a server may still be reading."""


def policy_weights(objective, backend: Backend, folder: Path, version: int, copy: bool = False
                   ) -> dict[str, torch.Tensor] | Path:
    """What `backend` loads to generate with the objective's current weights: the full state dict in the model's own
    names (gathered whole: FSDP2 holds shards; cloned when `copy`), or for a server the checkpoint folder written
    now (folder/v<version>). Collective under torchrun."""
    if isinstance(backend, EndpointBackend):
        path = Path(folder).resolve() / f"v{version:06d}"
        save_pretrained(distributed.unwrap(objective).model, path)
        for stale in sorted(Path(folder).resolve().glob("v*"))[:-KEEP_FOLDERS]:
            shutil.rmtree(stale, ignore_errors=True)
        return path
    # The objective names them "model." + the model's own names.
    state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True))
    return {k.removeprefix("model."): (v.detach().clone() if copy else v.detach()) for k, v in state.items()}


def load_policy(backend: Backend, weights: dict[str, torch.Tensor] | Path, version: int) -> None:
    """Make `backend` generate with `weights` (from policy_weights), as policy version `version`."""
    if isinstance(weights, Path):
        backend.update_weights(weights)
        return
    backend.engine.load_weights(weights, version)
