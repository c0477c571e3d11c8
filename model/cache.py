"""HybridCache: the decode state of a model for a batch of rows: KV for attention sublayers, conv + SSM state for Mamba.

Rows may hold prefixes of different lengths: each attention sublayer writes new keys at its row's own positions and
masks what lies past them. KV is preallocated to max_len per row.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, lengths: torch.Tensor, dtype, device):
        shape = (rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = lengths  # shared with the HybridCache: advanced once per forward, after every sublayer

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (b, hkv, t, d) after each row's prefix; return keys and values up to the longest row and the
        absolute positions (b, t) of the new tokens."""
        t = k.shape[2]
        positions = self.lengths[:, None] + torch.arange(t, device=k.device)
        span = int(positions.max()) + 1
        if span > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {span} needed")
        index = positions[:, None, :, None].expand_as(k)
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k[:, :, :span], self.v[:, :, :span], positions


class MambaCache:
    def __init__(self, cfg: ModelConfig, rows: int, dtype, ssm_dtype, device):
        self.conv = torch.zeros(rows, cfg.mamba_conv_dim, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            rows, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=ssm_dtype, device=device
        )

    def store(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)


class HybridCache:
    def __init__(
        self,
        cfg: ModelConfig,
        rows: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ssm_dtype: torch.dtype = torch.float32,
    ):
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        makers = {
            "*": lambda: KVCache(cfg, rows, max_len, self.lengths, dtype, device),
            "M": lambda: MambaCache(cfg, rows, dtype, ssm_dtype, device),
        }
        self.layers = [makers[kind]() if kind in makers else None for kind in cfg.main_pattern]

    def advance(self, t: int) -> None:
        self.lengths += t
