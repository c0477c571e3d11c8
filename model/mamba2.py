"""The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU -> SSD scan -> gated grouped RMSNorm -> out_proj."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_span, ssd_step
from model import context
from model.config import ModelConfig
from model.errors import UserError
from model.norm import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, inner, conv_dim = cfg.mamba_num_heads, cfg.mamba_inner, cfg.mamba_conv_dim
        # in_proj output splits as z (inner) | xBC (conv_dim) | dt (H).
        self.in_proj = nn.Linear(cfg.hidden_size, inner + conv_dim + H, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(inner, cfg.mamba_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A = -(1..H), D = 1, dt_bias = softplus^-1 of a log-uniform dt in [time_step_min, time_step_max]."""
        cfg, H = self.cfg, self.cfg.mamba_num_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, u: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """u (b, t, d). With a cache (model.cache.MambaCache) the scan starts from, and updates, its states: one step
        for decode (t = 1), a span computed at once when the cache keeps the state after every position (speculative
        verification), the chunked scan otherwise (prefill). Without one, seq_idx (b, t) gives each token's document in
        a packed row: conv and scan restart at every document. Under context parallelism (model.context) u and seq_idx
        are this rank's slice of the rows, and the conv and scan run head-parallel (`_head_parallel`)."""
        cfg = self.cfg
        b, t, _ = u.shape
        H, P, G, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state_size
        projected = self.in_proj(u)
        z, xBC, dt = projected.split([cfg.mamba_inner, cfg.mamba_conv_dim, H], dim=-1)
        cp = context.active()
        if cp is not None:
            y = self._head_parallel(projected[..., cfg.mamba_inner :], seq_idx, cp)
            return self.out_proj(self.norm(y, z, u.dtype))
        dt = self._dt(dt)
        A = -torch.exp(self.A_log.float())
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias

        if cache is not None and cache.keeps_positions:
            # Speculative verification: the t positions at once, keeping the state after each for MambaCache.rewind.
            conv_state, ssm_state = cache.read()
            # The conv state after position i is the last K-1 inputs of the window through i: a slice of the window.
            window = torch.cat([conv_state.to(xBC.dtype).transpose(1, 2), xBC], dim=1)  # (b, K-1+t, ch)
            conv_states = window.unfold(1, cfg.conv_kernel - 1, 1)[:, 1:]  # (b, t, ch, K-1)
            xBC, _ = causal_conv1d(xBC, weight, bias, conv_state)
            x, B, C = xBC.split([cfg.mamba_inner, G * N, G * N], dim=-1)
            y, ssm_states = ssd_span(
                ssm_state, x.view(b, t, H, P), dt, A, B.view(b, t, G, N), C.view(b, t, G, N), self.D
            )
            cache.store_positions(conv_states, ssm_states)
        elif cache is not None and t == 1:
            conv_state, ssm_state = cache.read()
            xBC, conv_state = causal_conv1d_step(xBC[:, 0], conv_state, weight, bias)
            x, B, C = xBC.split([cfg.mamba_inner, G * N, G * N], dim=-1)
            y, ssm_state = ssd_step(ssm_state, x.view(b, H, P), dt[:, 0], A, B.view(b, G, N), C.view(b, G, N), self.D)
            cache.store(conv_state, ssm_state)
            y = y[:, None]
        else:
            initial_conv, initial_ssm = (None, None) if cache is None else cache.read()
            y, conv_state, ssm_state = self._conv_scan(xBC, dt, weight, bias, A, self.D, G, initial_conv, initial_ssm,
                                                       seq_idx)
            if cache is not None:
                cache.store(conv_state, ssm_state)
        y = self.norm(y.reshape(b, t, -1), z, u.dtype)
        return self.out_proj(y)

    def _dt(self, dt: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """softplus(dt + dt_bias) in fp32, floored at dt_floor, for `heads`."""
        return F.softplus(dt.float() + self.dt_bias[heads].float()).clamp(min=self.cfg.dt_floor)

    def _conv_scan(
        self, xBC: torch.Tensor, dt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
        D: torch.Tensor, groups: int, initial_conv: torch.Tensor | None = None, initial_ssm: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The causal conv and the chunked scan over xBC (b, t, x | B | C channels) of h = dt.shape[-1] heads reading
        `groups` B/C groups, with their conv weight (channels, K) and bias, A and D (h,). Returns y (b, t, h, P) fp32
        and the conv and SSM states after the last position."""
        b, t, h = dt.shape
        P, N = self.cfg.mamba_head_dim, self.cfg.ssm_state_size
        xBC, conv_state = causal_conv1d(xBC, weight, bias, initial_conv, seq_idx)
        x, B, C = xBC.split([h * P, groups * N, groups * N], dim=-1)
        y, ssm_state = ssd_chunk_scan(
            x.view(b, t, h, P), dt, A, B.view(b, t, groups, N), C.view(b, t, groups, N), D,
            self.cfg.chunk_size, initial_ssm, seq_idx,
        )
        return y, conv_state, ssm_state

    def _head_parallel(self, xBCdt: torch.Tensor, seq_idx: torch.Tensor | None, cp: context.ContextGroup
                       ) -> torch.Tensor:
        """Context parallelism: this slice (b, t, ...) of every head's xBC and dt channels (xBCdt) becomes, through one
        all-to-all, the whole sequence (b, C t, ...) of this rank's H / C heads and their B/C groups; the conv (per
        channel) and the scan run over it, and the inverse all-to-all returns the output of this slice for all heads
        (b, t, inner), so the gated norm and out_proj see what they see in one process."""
        cfg = self.cfg
        problem = cfg.context_parallel_problem(cp.size)
        if problem:
            raise UserError(problem)
        h, groups = cfg.mamba_num_heads // cp.size, max(cfg.mamba_groups // cp.size, 1)
        channels = head_parallel_channels(cfg, cp.size).to(xBCdt.device)  # (C, channels of a rank)
        full = context.sequence_to_heads(xBCdt[..., channels.flatten()])
        mine, heads = channels[cp.rank, :-h], slice(cp.rank * h, (cp.rank + 1) * h)
        xBC, dt = full.split([len(mine), h], dim=-1)
        weight, bias = self.conv1d.weight[:, 0][mine], None if self.conv1d.bias is None else self.conv1d.bias[mine]
        A = -torch.exp(self.A_log[heads].float())
        y, _, _ = self._conv_scan(xBC, self._dt(dt, heads), weight, bias, A, self.D[heads], groups,
                                  seq_idx=context.gather_sequence(seq_idx))
        return context.heads_to_sequence(y.flatten(2))


def head_parallel_channels(cfg: ModelConfig, ranks: int) -> torch.Tensor:
    """(ranks, channels) int64: for each of `ranks` context-parallel ranks, the channels of in_proj's xBC | dt output
    its heads read, in that order: x of its H / ranks heads, B and C of their groups (with more ranks than groups a
    group is shared by the ranks of its heads), dt of its heads."""
    H, P, G, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state_size
    h, groups = H // ranks, max(G // ranks, 1)
    rows = []
    for r in range(ranks):
        first = r * h // (H // G)  # the group of the rank's first head
        group_channels = torch.arange(first * N, (first + groups) * N)
        rows.append(torch.cat([
            torch.arange(r * h * P, (r + 1) * h * P),
            cfg.mamba_inner + group_channels,
            cfg.mamba_inner + G * N + group_channels,
            cfg.mamba_conv_dim + torch.arange(r * h, (r + 1) * h),
        ]))
    return torch.stack(rows)
