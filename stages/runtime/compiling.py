"""torch.compile for training: every block compiled on its own, as torchtitan compiles each transformer block. On a
small model the step is hundreds of small elementwise ops (the SSD scan's decays, gated norms, routing, residual
adds); compiled, each block's ops fuse into a few kernels, forward and backward. In LatentMoE blocks the expert GEMMs,
whose row counts change every step, are one opaque custom op (kernels.moe), so the graph has static shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def compile_blocks(model: nn.Module, note: Callable[[str], None]) -> int:
    """Compile the blocks of the main stack and the MTP head in place (before DDP/FSDP wrap them). When
    torch.compile cannot build code on this machine (on CPU it needs a C++ compiler) `note` says so and nothing is
    compiled; otherwise `note` says how many blocks will compile. Returns that number."""
    problem = _toolchain_problem()
    if problem is not None:
        note(f"train.compile: torch.compile does not work here ({problem}); training eagerly")
        return 0
    # children(): the main stack is a ModuleList, or a pipeline stage's ModuleDict of its sublayers
    layers = list(model.model.layers.children()) + (list(model.mtp.layers) if model.mtp is not None else [])
    from model.engine.engine import RECOMPILE_LIMIT

    # Every block's graphs are entries of the one Block.forward: a graph per kind of block, sequence length and grad
    # mode, where dynamo's default limit (8) would send the rest to eager code. Scoped to these calls, as the engine's.
    limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
    for block in layers:
        block.forward = _static_in_length(limit(torch.compile(block.forward)))
    note(f"train.compile: {len(layers)} blocks compile during the first steps")
    return len(layers)


def _static_in_length(forward: Callable) -> Callable:
    """A compiled block's forward with the sequence dimension (1) of its tensor arguments static: a graph per length,
    dynamic only in the batch. Inductor's CPU code for the backward of a block whose length is symbolic (torch 2.13,
    vectorized C++) writes out of bounds: glibc aborts ("double free or corruption") at the first step of a second
    length, as an `n3 extend` run's short iterations after its long ones. Training meets only a few lengths."""
    def call(*args, **kwargs):
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and x.dim() > 1:
                torch._dynamo.mark_static(x, 1)
        return forward(*args, **kwargs)

    return call


def _toolchain_problem() -> str | None:
    """None when torch.compile builds and runs a small function with gradients, else the error in one line."""
    probe = torch.compile(lambda x: (x.sin() * 2).sum())
    try:
        probe(torch.ones(3, requires_grad=True)).backward()
    except Exception as err:  # inductor reports a missing compiler in many ways; any failure means "do not compile"
        return " ".join(str(err).split())[:200]
    return None
