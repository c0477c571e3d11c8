"""The model core: config, layers, the hybrid model, its cache and Hugging Face checkpoint I/O. Knows nothing of the
CLI, presets, files beyond checkpoints, or the network.

Exports resolve on first use, so `model.errors` and `model.config` import without torch (the CLI starts fast).
"""

import importlib

_EXPORTS = {
    "HybridCache": "model.cache",
    "ModelConfig": "model.config",
    "NemotronH": "model.hybrid",
    "build": "model.hybrid",
    "from_pretrained": "model.checkpoint",
    "resolve_checkpoint": "model.checkpoint",
    "save_pretrained": "model.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
