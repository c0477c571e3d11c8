"""The hybrid stack: embedding -> pre-norm residual sublayers from the pattern -> final RMSNorm -> untied lm_head,
plus the MTP head. Module names mirror transformers' NemotronH, so state-dict keys are its checkpoint keys."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import context
from model.attention import Attention
from model.config import ModelConfig
from model.mamba2 import Mamba2Mixer
from model.mlp import MLP
from model.moe import Experts, LatentMoE, Router
from model.norm import GatedRMSNorm, RMSNorm

MIXERS = {
    "M": Mamba2Mixer,
    "*": Attention,
    "E": LatentMoE,
    "-": lambda cfg: MLP(cfg.hidden_size, cfg.intermediate_size),
}


class Block(nn.Module):
    """h + mixer(norm(h)): one character of the pattern."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = MIXERS[kind](cfg)

    def forward(self, h: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, t, d); seq_idx (b, t) the document of each token of packed rows (see kernels.documents), or None."""
        if cache is not None and seq_idx is not None:
            raise ValueError("seq_idx marks the documents of packed training rows; a cache row is one request: "
                             "pass one or the other")
        if cache is not None and context.active() is not None:
            raise ValueError("context parallelism splits packed training rows over ranks; a cache row is one request: "
                             "run it outside model.context.context_parallel")
        return h + self.mixer(self.norm(h), cache, seq_idx)


def run_sublayer(layer: Block, h: torch.Tensor, cache, seq_idx: torch.Tensor | None, recompute: bool) -> torch.Tensor:
    """One sublayer; with `recompute` (activation checkpointing, training forwards only) its activations are not
    kept but recomputed in the backward (torch.utils.checkpoint, non-reentrant)."""
    if recompute and cache is None and torch.is_grad_enabled():
        return checkpoint(layer, h, None, seq_idx, use_reentrant=False)
    return layer(h, cache, seq_idx)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.main_pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.residual_rms: list[torch.Tensor] | None = None
        """Set to a list to have every forward append each sublayer's output RMS (detached fp32 scalars): the
        per-layer residual norms training watches, since early-layer spikes preceded divergence."""
        self.checkpointing = False
        """Activation checkpointing (NemotronH.set_activation_checkpointing)."""

    def forward(self, input_ids: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = run_sublayer(layer, h, None if cache is None else cache.layers[i], seq_idx, self.checkpointing)
            if self.residual_rms is not None:
                self.residual_rms.append(rms(h))
        return self.norm_f(h)


def rms(h: torch.Tensor) -> torch.Tensor:
    """The root mean square of a hidden state, a detached fp32 scalar (each sublayer's output, as training watches)."""
    return torch.linalg.vector_norm(h.detach(), dtype=torch.float32) / h.numel() ** 0.5


class MTPBlock(Block):
    """An MTP sublayer: the first also fuses [enorm(emb), hnorm(h)] through eh_proj, the last ends in its own norm."""

    def __init__(self, cfg: ModelConfig, kind: str, first: bool, last: bool):
        super().__init__(cfg, kind)
        d = cfg.hidden_size
        if first:
            self.enorm = RMSNorm(d, cfg.norm_eps)
            self.hnorm = RMSNorm(d, cfg.norm_eps)
            self.eh_proj = nn.Linear(2 * d, d, bias=False)
        if last:
            self.final_layernorm = RMSNorm(d, cfg.norm_eps)


class MTP(nn.Module):
    """One weight set applied recursively: depth k maps (h_{k-1}, emb(t_{i+k})) to h_k; logits come from the shared lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = len(cfg.mtp_pattern)
        self.layers = nn.ModuleList(
            MTPBlock(cfg, kind, first=j == 0, last=j == n - 1) for j, kind in enumerate(cfg.mtp_pattern)
        )
        self.checkpointing = False

    def forward(
        self, h_prev: torch.Tensor, next_emb: torch.Tensor, caches=None, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h_prev (b, t, d) post-norm hidden of the model or the previous depth; next_emb the embedding of the token
        each position is fed next; seq_idx (b, t) the document of each position, or None. Returns this depth's
        post-norm hidden."""
        first, last = self.layers[0], self.layers[-1]
        h = first.eh_proj(torch.cat([first.enorm(next_emb), first.hnorm(h_prev)], dim=-1))
        for j, layer in enumerate(self.layers):
            h = run_sublayer(layer, h, None if caches is None else caches[j], seq_idx, self.checkpointing)
        return last.final_layernorm(h)


class NemotronH(nn.Module):
    """Hybrid Mamba-2 / attention / LatentMoE language model. `model(input_ids)` -> fp32 logits (b, t, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTP(cfg) if cfg.mtp_pattern else None

    def forward(self, input_ids: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (b, t). With a model.cache.HybridCache the tokens extend each row's cached prefix. Without one,
        seq_idx (b, t) gives the document of each token of packed rows: no token sees another document."""
        h = self.model(input_ids, cache, seq_idx)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    def set_activation_checkpointing(self, on: bool) -> None:
        """With it on, a training forward keeps only each sublayer's input (backbone and MTP block) and the backward
        recomputes the sublayer: activations fall to one hidden state per sublayer and token."""
        self.model.checkpointing = on
        if self.mtp is not None:
            self.mtp.checkpointing = on

    def mtp_hidden(
        self, h: torch.Tensor, input_ids: torch.Tensor, depths: int, seq_idx: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Teacher-forced MTP unroll for training: depth k at position i sees emb(t_{i+k}) and predicts t_{i+k+1}.
        The last k positions of depth k see wrapped-around tokens, and with seq_idx (packed rows) those whose t_{i+k}
        lies in the next document see its tokens; their labels must be masked (stages.runtime.losses.mtp_labels)."""
        return list(self.mtp_unroll(h, input_ids, depths, seq_idx))

    def mtp_unroll(
        self, h: torch.Tensor, input_ids: torch.Tensor, depths: int, seq_idx: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """`mtp_hidden` one depth at a time, so a caller can read per-depth state (MoE routing) between depths."""
        for k in range(1, depths + 1):
            h = self.mtp_depth(h, input_ids, k, seq_idx)
            yield h

    def mtp_depth(
        self, h: torch.Tensor, input_ids: torch.Tensor, k: int, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Depth k of the teacher-forced unroll from its input hidden h (b, t, d): position i fed emb(t_{i+k})."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (its pattern has no '/')")
        # Under context parallelism the tokens k ahead of a slice's last positions lie in the next slice.
        return self.mtp(h, self.model.embeddings(context.roll_sequence(input_ids, -k)), seq_idx=seq_idx)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation of transformers' NemotronH: normal(0, initializer_range) for linears, embeddings, router and
        experts; Mamba A, D, dt_bias as Mamba-2; Mamba out_proj kaiming-uniform / sqrt(layers) (GPT-2 residual scaling)."""
        cfg = self.config
        std = cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Experts):
                nn.init.normal_(module.up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
        # After the pass above, which also drew out_proj from the normal.
        for module in self.modules():
            if isinstance(module, Mamba2Mixer):
                module.conv1d.reset_parameters()
                module.reset_ssm_parameters()
                if cfg.rescale_prenorm_residual:
                    nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                    module.out_proj.weight /= math.sqrt(cfg.num_layers)


def build(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NemotronH:
    """A freshly initialised model; on the meta device nothing is allocated (for plans and dry runs)."""
    with torch.device(device or "cpu"):
        model = NemotronH(cfg)
    if torch.device(device or "cpu").type != "meta":
        model.init_weights()
    if dtype is not None:
        cast(model, dtype)
    return model


def with_mtp_head(model: NemotronH, pattern: str = "*E") -> NemotronH:
    """A copy of a model without an MTP head (Nemotron 3 Nano) that has one of `pattern`: the backbone's weights as
    they are; each MTP sublayer starts from the backbone's last sublayer of its kind (a trained attention or MoE
    rather than noise), eh_proj, enorm, hnorm and the final norm freshly initialised."""
    if model.mtp is not None:
        raise ValueError("the model has an MTP head already")
    first = next(model.parameters())
    cfg = dataclasses.replace(model.config, pattern=f"{model.config.pattern}/{pattern}")
    grown = build(cfg, device=first.device, dtype=first.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("mtp.") for name in missing):
        raise ValueError(f"cannot carry the weights over: missing {missing}, unexpected {unexpected}")
    for block in grown.mtp.layers:
        source = next((b for b in reversed(model.model.layers) if b.kind == block.kind), None)
        if source is not None:
            block.norm.load_state_dict(source.norm.state_dict())
            block.mixer.load_state_dict(source.mixer.state_dict())
    return grown


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to dtype; routers (weights and expert bias) are kept in fp32."""
    for module in model.modules():
        keep = torch.float32 if isinstance(module, Router) else dtype
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(keep)
    return model
