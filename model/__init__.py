"""The model core: config, layers, the hybrid model, its cache and Hugging Face checkpoint I/O. Knows nothing of the
CLI, presets, files beyond checkpoints, or the network."""

from model.cache import HybridCache
from model.checkpoint import from_pretrained, save_pretrained
from model.config import ModelConfig
from model.hybrid import NemotronH, build

__all__ = ["HybridCache", "ModelConfig", "NemotronH", "build", "from_pretrained", "save_pretrained"]
