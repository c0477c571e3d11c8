"""LatentMoE: a sigmoid router on the full width, routed relu^2 experts in a latent width, a shared expert on the full width.

    y = fc2_latent( sum_{i in TopK(s + b)} w_i E_i(fc1_latent(x)) ) + Shared(x),   s = sigmoid(W_g x) in fp32,
    w_i = routed_scaling * s_i / (sum_selected s_j + 1e-20)   (renormalised when norm_topk_prob)

The expert bias b (e_score_correction_bias) only chooses experts; it never enters the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import group_by_expert, grouped_mm, permute_rows
from model.config import ModelConfig
from model.expert_parallel import ExpertGroup, exchange, scale_gradient
from model.mlp import MLP, relu2


class Router(nn.Module):
    """Weights and bias stay fp32 whatever the model dtype: routing decisions are sensitive to rounding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.scaling = cfg.routed_scaling_factor
        self.renormalise = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, d) -> scores (tokens, E) fp32, chosen expert ids (tokens, k), their weights (tokens, k) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            scores = torch.sigmoid(x.float() @ self.weight.float().T)
        chosen = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, chosen)
        if self.renormalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, chosen, weights * self.scaling


GATHER_BYTES = 1 << 25
"""Up to this many bytes of gathered expert weights (32 MiB), a compiled forward without gradients gathers them."""


class Experts(nn.Module):
    """Routed experts stacked as (E, out, in), the transformers-5 layout: up (E, m, l), down (E, l, m)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, m, l = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.expert_width
        self.up_proj = nn.Parameter(torch.empty(E, m, l))
        self.down_proj = nn.Parameter(torch.empty(E, l, m))
        self.parallel: ExpertGroup | None = None
        """Set by expert-parallel training: the group whose ranks hold the experts, this rank a contiguous share
        (the parameters are then DTensors sharded on the expert dimension)."""

    @property
    def num_experts(self) -> int:
        """All the layer's experts, wherever they live."""
        return self.up_proj.shape[0]

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (tokens, l); each token's k copies run through their experts, weighted and summed in fp32."""
        if self.parallel is None and self.gathers(chosen.numel()):
            h = relu2(self.up_proj[chosen] @ x[:, None, :, None])  # (tokens, k, m, 1)
            out = (self.down_proj[chosen] @ h).squeeze(-1).float()  # (tokens, k, l)
            return (out * weights[..., None]).sum(1).to(x.dtype)
        tokens, k = chosen.shape
        order, inverse, counts = group_by_expert(chosen, self.num_experts)
        copies = x[:, None].expand(tokens, k, x.shape[1]).reshape(tokens * k, -1)  # row token * k + slot
        rows = permute_rows(copies, order, inverse)
        if self.parallel is None:
            out = self.run_experts(rows, counts)
        else:
            out = exchange(rows, counts, self.parallel, self.run_experts)
        out = permute_rows(out, inverse, order).view(tokens, k, -1)
        return (out.float() * weights[..., None]).sum(1).to(x.dtype)

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts this rank holds on rows grouped by expert (counts: rows per expert, in order)."""
        up, down = _local(self.up_proj), _local(self.down_proj)
        if self.parallel is not None:
            up, down = (scale_gradient(w, self.parallel.gradient_scale) for w in (up, down))
        return self.matmul(relu2(self.matmul(rows, up, counts)), down, counts)

    def gathers(self, copies: int) -> bool:
        """Whether a forward over `copies` token copies gathers each copy's expert weights instead of grouping rows
        by expert: in compiled forwards without gradients (the engine's decode steps) while the gathered weights stay
        within GATHER_BYTES. On a few tokens that is a few large ops where grouping is many small ones (1.5-1.8x the
        decode speed on CPU); on many (a validation batch) or with gradients, grouping reads each expert once."""
        per_copy = (self.up_proj[0].numel() + self.down_proj[0].numel()) * self.up_proj.element_size()
        return torch.compiler.is_compiling() and not torch.is_grad_enabled() and copies * per_copy <= GATHER_BYTES

    def matmul(self, rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The expert GEMM (see kernels.grouped_mm); low-precision subclasses (model.lowp, n3 quantize) override it."""
        return grouped_mm(rows, weight, counts)


class LatentMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)
        latent = cfg.moe_latent_size
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=False) if latent else nn.Identity()
        self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=False) if latent else nn.Identity()
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None
        """(scores, chosen) of the last training forward, for load balancing and MaxVio; None in eval."""

    def forward(self, x: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d); token by token, so the cache and documents (seq_idx) of the mixer interface play no part."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, chosen, weights = self.gate(flat)
        self.last_routing = (scores, chosen) if self.training else None
        routed = self.fc2_latent_proj(self.experts(self.fc1_latent_proj(flat), chosen, weights))
        return (routed + self.shared_experts(flat)).view(shape)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight that expert parallelism shards (a DTensor); any other weight as it is."""
    return weight.to_local() if hasattr(weight, "to_local") else weight
