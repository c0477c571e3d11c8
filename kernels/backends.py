"""Backend choice per hot op: the PyTorch reference everywhere, fast paths where their package and device exist.

`configure(ssd="auto", ...)` is called once per run from the preset's [kernels] table. "auto" picks a fast path when
the tensors are on CUDA and its package imports; "torch" forces the reference; a named backend must be importable.
Fast-path packages are imported lazily, on first use, so a CPU machine never needs them.
"""

from __future__ import annotations

import importlib
from functools import cache

# op -> fast backend -> module that must import for it to run
FAST_PATHS: dict[str, dict[str, str]] = {
    "ssd": {"mamba_ssm": "mamba_ssm.ops.triton.ssd_combined"},
    "conv1d": {"causal_conv1d": "causal_conv1d"},
    "attention": {"flash": "flash_attn"},
    "moe": {"grouped_mm": "torch"},
    "fp8_gemm": {"scaled_mm": "torch"},  # torch._scaled_mm; also needs compute capability 8.9+ (checked per call)
}
CHOICES: dict[str, tuple[str, ...]] = {op: ("auto", "torch", *fast) for op, fast in FAST_PATHS.items()}

_chosen: dict[str, str] = {op: "auto" for op in FAST_PATHS}


@cache
def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a CUDA-only package fails at import in many ways on a CPU machine
        return False
    return True


def configure(**choices: str) -> None:
    """Set the backend of each named op; a fast path asked for by name must be installed (ValueError if not)."""
    for op, name in choices.items():
        if op not in CHOICES:
            raise ValueError(f"kernels.{op}: unknown op; ops are {', '.join(CHOICES)}")
        if name not in CHOICES[op]:
            raise ValueError(f"kernels.{op} = {name!r}: choose one of {', '.join(CHOICES[op])}")
        if name in FAST_PATHS[op] and not importable(FAST_PATHS[op][name]):
            raise ValueError(
                f"kernels.{op} = {name!r} but {FAST_PATHS[op][name].split('.')[0]} does not import here; "
                f"install the gpu extra (pip install 'n3[gpu]') or set kernels.{op}=auto"
            )
        _chosen[op] = name


def fast_path(op: str, on_cuda: bool) -> str | None:
    """The fast backend to use for `op` on these tensors, or None for the PyTorch reference."""
    name = _chosen[op]
    if name == "torch" or not on_cuda:
        return None
    if name != "auto":
        return name
    for candidate, module in FAST_PATHS[op].items():
        if importable(module):
            return candidate
    return None


def chosen() -> dict[str, str]:
    return dict(_chosen)
