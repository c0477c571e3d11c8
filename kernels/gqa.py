"""Causal grouped-query attention without positional embedding, through scaled_dot_product_attention.

Fast path: flash-attn's `flash_attn_func` for full causal sequences on CUDA. With a KV cache the queries sit at known
absolute positions and a boolean mask says which keys each may see; SDPA then picks its own fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """q (b, hq, tq, d); k, v (b, hkv, tk, d) with hq a multiple of hkv; scale d ** -0.5.

    q_positions None: q and k are the same tokens, causal. Otherwise (b, tq) absolute positions: query i of row b
    sees keys 0..q_positions[b, i] (keys past a row's length are never seen). Returns (b, hq, tq, d).
    """
    if q_positions is None:
        if fast_path("attention", q.is_cuda) == "flash" and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    keys = torch.arange(k.shape[2], device=q.device)
    mask = keys[None, None, None, :] <= q_positions[:, None, :, None]  # (b, 1, tq, tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
