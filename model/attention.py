"""Grouped-query attention with no positional embedding (position comes from the Mamba layers) and a KV cache path."""

from __future__ import annotations

import torch
from torch import nn

from kernels import attention
from model import context
from model.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, t, d). With a cache (model.cache.KVCache) the new keys and values are appended per row first. Without
        one, seq_idx (b, t) gives each token's document in a packed row: a token attends within its document only.
        Under context parallelism (model.context) x and seq_idx are this rank's slice of the rows: the keys, values
        and documents of the whole rows are gathered, and the slice's queries attend at their absolute positions."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v, positions = cache.append(k, v)
            out = attention(q, k, v, q_positions=positions)
        elif context.active() is None:
            out = attention(q, k, v, seq_idx=seq_idx)
        else:
            k, v, seq_idx = context.gather_sequence(k, 2), context.gather_sequence(v, 2), context.gather_sequence(seq_idx)
            out = attention(q, k, v, q_positions=context.positions(b, t, x.device), seq_idx=seq_idx)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
