"""Causal grouped-query attention without positional embedding, through scaled_dot_product_attention.

Fast path on CUDA in fp16 / bf16: flash-attn's `flash_attn_func` for full causal sequences, `flash_attn_varlen_func`
for packed rows (`seq_idx`, see kernels.documents), each document a sequence of its own. Elsewhere packed rows go
through causal SDPA one document at a time, or, in compiled code, through SDPA with a mask that is causal and
block-diagonal over documents. With a KV cache, or as a context-parallel
slice of longer rows (model.context), the queries sit at known absolute positions and a boolean mask says which keys
each may see; SDPA then picks its own fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import fast_path
from kernels.documents import cu_seqlens_from_seq_idx


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (b, hq, tq, d); k, v (b, hkv, tk, d) with hq a multiple of hkv; scale d ** -0.5.

    q_positions None: q and k are the same tokens, causal. Otherwise (b, tq) absolute positions: query i of row b
    sees keys 0..q_positions[b, i] (keys past a row's length are never seen). seq_idx (b, tk): the document index of
    each key (without q_positions the queries are the keys); a query, whose document is that of the key at its own
    position, sees only the earlier keys of its own document. Returns (b, hq, tq, d).
    """
    gqa = q.shape[1] != k.shape[1]
    if q_positions is not None:
        keys = torch.arange(k.shape[2], device=q.device)
        mask = keys[None, :] <= q_positions[:, :, None]  # (b, tq, tk)
        if seq_idx is not None:  # a context-parallel slice of packed rows (model.context): keys of the whole rows
            mask = mask & (seq_idx[:, None, :] == seq_idx.gather(1, q_positions)[:, :, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    flash = fast_path("attention", q.is_cuda) == "flash" and q.dtype in (torch.float16, torch.bfloat16)
    if seq_idx is not None:
        if flash:
            return _flash_varlen(q, k, v, seq_idx)
        if not torch.compiler.is_compiling():
            return _per_document(q, k, v, seq_idx)
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril_()
        mask = causal & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])  # (b, 1, t, t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if flash:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Packed rows through flash_attn_varlen_func: the b * t tokens flattened into (tokens, heads, d), every document
    one causal sequence of it (flash-attn takes GQA as it comes)."""
    from flash_attn import flash_attn_varlen_func

    b, hq, t, d = q.shape
    cu_seqlens, longest = cu_seqlens_from_seq_idx(seq_idx)
    flat = lambda z: z.transpose(1, 2).reshape(b * t, z.shape[1], d)
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, longest, longest, causal=True)
    return out.view(b, t, hq, d).transpose(1, 2)


def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Packed rows as one causal SDPA per document: SDPA's fused causal kernel, where a block-diagonal mask would send
    it to the unfused one (3.5x slower at 4096 tokens on CPU) and spend work on the pairs it masks. Reads the document
    lengths back to the host, so compiled code takes the mask instead."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for i, documents in enumerate(seq_idx):
        lengths = torch.unique_consecutive(documents, return_counts=True)[1].tolist()
        parts = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa) for qd, kd, vd in
                 zip(q[i : i + 1].split(lengths, 2), k[i : i + 1].split(lengths, 2), v[i : i + 1].split(lengths, 2))]
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows)
