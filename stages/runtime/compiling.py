"""torch.compile for training: every Mamba, attention and MLP block compiled on its own, as torchtitan compiles each
transformer block. On a small model the step is hundreds of small elementwise ops (the SSD scan's decays, gated norms,
residual adds); compiled, each block's ops fuse into a few kernels, forward and backward.

LatentMoE blocks stay eager: the tokens each expert receives change every step, and dynamo would break the graph at
every data-dependent split or recompile for new counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def compile_blocks(model: nn.Module, note: Callable[[str], None]) -> int:
    """Compile the non-MoE blocks of the main stack and the MTP head in place (before DDP/FSDP wrap them). When
    torch.compile cannot build code on this machine (on CPU it needs a C++ compiler) `note` says so and nothing is
    compiled; otherwise `note` says how many blocks will compile. Returns that number."""
    problem = _toolchain_problem()
    if problem is not None:
        note(f"train.compile: torch.compile does not work here ({problem}); training eagerly")
        return 0
    layers = list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    blocks = [layer for layer in layers if layer.kind != "E"]
    for block in blocks:
        block.compile()
    note(f"train.compile: {len(blocks)} Mamba, attention and MLP blocks compile during the first steps")
    return len(blocks)


def _toolchain_problem() -> str | None:
    """None when torch.compile builds and runs a small function with gradients, else the error in one line."""
    probe = torch.compile(lambda x: (x.sin() * 2).sum())
    try:
        probe(torch.ones(3, requires_grad=True)).backward()
    except Exception as err:  # inductor reports a missing compiler in many ways; any failure means "do not compile"
        return " ".join(str(err).split())[:200]
    return None
