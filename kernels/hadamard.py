"""The 16x16 random Hadamard transform of the NVFP4 training recipe (arXiv 2509.25149).

Q = diag(s) H / 4 with H the 16x16 Sylvester Hadamard matrix and s one fixed random sign vector; Q is orthonormal,
so transforming both operands of a GEMM along their contracted dimension leaves the product unchanged while it
spreads outliers across each block of 16 before FP4 quantization. The recipe applies it to the weight-gradient GEMM
operands only.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

SIZE = 16
SIGN_SEED = 0
"""Seed of the fixed sign vector: every rank and every step must use the same Q."""


@cache
def hadamard_matrix(size: int = SIZE) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix (size a power of two), fp32 on the CPU."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size**0.5


@cache
def random_hadamard_matrix(size: int = SIZE, seed: int = SIGN_SEED) -> torch.Tensor:
    """Q = diag(s) H with one fixed random sign per row."""
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs[:, None].float() * hadamard_matrix(size)


def random_hadamard_transform(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """x @ blockdiag(Q, Q, ...) along the last dimension, zero-padded to whole blocks (the padding stays: a GEMM
    over the transformed dimension must see both operands padded alike). Computed in fp32, returned in x's dtype."""
    n = x.shape[-1]
    padded = F.pad(x.float(), (0, -n % size))
    q = random_hadamard_matrix(size).to(x.device)
    return (padded.unflatten(-1, (-1, size)) @ q).flatten(-2).to(x.dtype)
