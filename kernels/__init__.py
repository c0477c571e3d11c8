"""The kernel core: one function per hot op, each a PyTorch reference with fast paths chosen at run time.

Exports resolve on first use, so `kernels.backends` (the backend names presets validate against) imports without torch.
"""

import importlib

_EXPORTS = {
    "attention": "kernels.gqa",
    "causal_conv1d": "kernels.conv",
    "causal_conv1d_step": "kernels.conv",
    "configure": "kernels.backends",
    "cu_seqlens_from_seq_idx": "kernels.documents",
    "fp8_quantize": "kernels.fp8",
    "group_by_expert": "kernels.moe",
    "linear_cross_entropy": "kernels.cross_entropy",
    "permute_rows": "kernels.moe",
    "grouped_mm": "kernels.moe",
    "mxfp8_quantize": "kernels.fp8",
    "nvfp4_fake_quantize": "kernels.nvfp4",
    "nvfp4_quantize": "kernels.nvfp4",
    "random_hadamard_transform": "kernels.hadamard",
    "scaled_mm": "kernels.fp8",
    "seq_idx_from_cu_seqlens": "kernels.documents",
    "seq_idx_from_lengths": "kernels.documents",
    "ssd_chunk_scan": "kernels.ssd",
    "ssd_span": "kernels.ssd",
    "ssd_step": "kernels.ssd",
    "stochastic_round": "kernels.rounding",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
