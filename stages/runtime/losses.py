"""The language-modelling objective: next-token cross-entropy, the MTP losses, MoE load balancing.

- Heads: the main head predicts t+1; MTP depth k (one weight set applied recursively) predicts t+k+1. All heads share
  lm_head, and their losses go through one fused linear cross-entropy, so lm_head's gradient is assembled once.
- Sequence-level aux loss (DeepSeek-V3's complementary sequence-wise loss, Megatron-Bridge's `seq_aux_loss`), per MoE
  layer and sequence of T tokens, with s' the sigmoid scores renormalised over the E experts:
      f_i = E / (K T) * #{t : i in TopK_t},   P_i = mean_t s'_{t,i},   L = sum_i f_i P_i   (1 when balanced)
- Aux-loss-free balancing: after each optimizer step, bias_i += rate * sign(mean load - load_i), with the load counted
  over the whole global batch; the bias only chooses experts (see model/moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import linear_cross_entropy
from kernels.cross_entropy import IGNORE
from model import context
from model.hybrid import NemotronH
from model.moe import LatentMoE
from presets.schema import TrainConfig


def mtp_labels(labels: torch.Tensor, depth: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Labels of MTP depth k: position i predicts labels[i + k]; the last k positions, which see wrapped-around
    tokens, are ignored. Without seq_idx an ignored label marks a document boundary (as pretraining packs documents):
    the label is kept only when no ignored label lies between. With seq_idx (b, t), the documents of packed rows, the
    loss mask and the boundaries are apart (a prompt's ignored labels in SFT): labels[i + k] is kept unless ignored
    itself or in another document than position i. Under context parallelism (model.context) labels and seq_idx are
    this rank's slice of the rows: the labels are those of the whole rows, sliced."""
    if depth == 0:
        return labels
    whole = _mtp_labels(context.gather_sequence(labels), depth, context.gather_sequence(seq_idx))
    return context.local_slice(whole)


def _mtp_labels(labels: torch.Tensor, depth: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """mtp_labels of whole rows."""
    target = torch.roll(labels, -depth, dims=1)
    if seq_idx is None:
        valid = labels != IGNORE
        for k in range(1, depth + 1):
            valid = valid & torch.roll(labels != IGNORE, -k, dims=1)
    else:
        valid = (target != IGNORE) & (torch.roll(seq_idx, -depth, dims=1) == seq_idx)
    valid[:, -depth:] = False
    return torch.where(valid, target, IGNORE)


def head_token_counts(labels: torch.Tensor, depths: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Labels that take a loss, per head (1 + depths,): what each head's summed loss is divided by."""
    return torch.stack([(mtp_labels(labels, k, seq_idx) != IGNORE).sum() for k in range(depths + 1)]).float()


def sequence_aux_loss(scores: torch.Tensor, chosen: torch.Tensor, sequences: int) -> torch.Tensor:
    """scores (tokens, E) fp32 and chosen (tokens, K) of `sequences` equal-length sequences -> mean over sequences.
    Under context parallelism (model.context) the tokens are this rank's slice of each sequence; f and P count the
    whole sequences (their sums over the slices), so every rank of the group gets the loss of one process."""
    tokens, experts = scores.shape
    top_k = chosen.shape[1]
    per_sequence = tokens // sequences
    shares = (scores / scores.sum(-1, keepdim=True)).view(sequences, per_sequence, experts).sum(1)
    picked = torch.zeros(sequences, experts, device=scores.device)
    picked.scatter_add_(1, chosen.view(sequences, -1), torch.ones(chosen.numel(), device=scores.device).view(sequences, -1))
    # Per-sequence totals over the slices of a context-parallel group (this rank's own without one).
    shares, picked = context.sum_over_sequence(torch.stack([shares, picked])).unbind()
    length = per_sequence * context.size()
    f = picked * experts / (top_k * length)
    return (f * shares / length).sum(-1).mean()


def expert_load(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """Tokens routed to each expert (experts,) fp32."""
    return torch.bincount(chosen.reshape(-1), minlength=experts).float()


@torch.no_grad()
def update_expert_bias(moe: LatentMoE, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing: raise the bias of underloaded experts, lower it for overloaded ones. A frozen router
    (LoRA leaves the base model as it is) keeps its bias too."""
    if not moe.gate.weight.requires_grad:
        return
    bias = moe.gate.e_score_correction_bias
    bias += rate * torch.sign(load.mean() - load).to(bias.device)


def moe_layers(model: NemotronH) -> tuple[list[LatentMoE], list[LatentMoE]]:
    """The MoE mixers of the main stack and of the MTP block, in order."""
    main = [layer.mixer for layer in model.model.layers if isinstance(layer.mixer, LatentMoE)]
    mtp = [] if model.mtp is None else [layer.mixer for layer in model.mtp.layers if isinstance(layer.mixer, LatentMoE)]
    return main, mtp


class CausalLMObjective(nn.Module):
    """Wraps a NemotronH; its forward is the training loss, so DDP and FSDP wrap this module and see every use of
    lm_head (the main and MTP heads) inside one forward.

    forward(input_ids, labels, weights, seq_idx) with weights (heads + 1 floats) = the multiplier of each head's summed
    loss (main, MTP depths) and of the mean aux loss, set by the loop from the global token counts, and seq_idx (b, t)
    the documents of packed rows (kernels.documents) or None: with it no head predicts across a document. Returns:
    loss (the scalar to backpropagate), head_sums (heads,) summed losses, aux (scalar), expert_load (MoE layers, E),
    residual_rms (layers,), all but loss detached. In eval mode (or weights None) only the main head's loss sum.
    """

    def __init__(self, model: NemotronH, mtp_depths: int):
        super().__init__()
        if mtp_depths and model.mtp is None:
            raise ValueError("mtp_depths > 0 but the model has no MTP block")
        self.model = model
        self.mtp_depths = mtp_depths
        self.main_moes, mtp_moes = moe_layers(model)
        self.mtp_moes = mtp_moes if mtp_depths else []
        """The MoE layers whose expert load forward reports, in its order: the main stack's, then the MTP block's
        (summed over depths) when MTP trains."""
        config = model.config
        self.moe_names = [f"{i}" for i, kind in enumerate(config.main_pattern) if kind == "E"]
        self.moe_names += [f"mtp.{j}" for j, kind in enumerate(config.mtp_pattern) if kind == "E" and mtp_depths]

    @property
    def heads(self) -> int:
        return 1 + self.mtp_depths

    def head_scales(self, train: TrainConfig) -> list[float]:
        """The weight of each head's mean loss: 1 for the next token, the MTP loss scale shared by the depths the
        objective trains (not the table's: a model without an MTP head trains none)."""
        return [1.0] + ([train.mtp_loss_scale / self.mtp_depths] * self.mtp_depths if self.mtp_depths else [])

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        weights: list[float] | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> dict:
        model = self.model
        backbone = model.model
        backbone.residual_rms = [] if self.training else None
        h = backbone(input_ids, seq_idx=seq_idx)
        if not self.training or weights is None:
            return {"head_sums": head_losses([h], [labels], model.lm_head.weight, [1.0])[1]}

        hidden, targets = [h], [labels]
        aux = aux_terms(self.main_moes, input_ids.shape[0], h.device)
        loads = [expert_load(moe.last_routing[1], moe.gate.weight.shape[0]) for moe in self.main_moes]
        mtp_loads = [0.0] * len(self.mtp_moes)
        depths = model.mtp_unroll(h, input_ids, self.mtp_depths, seq_idx) if self.mtp_depths else []
        for k, hk in enumerate(depths, 1):
            hidden.append(hk)
            targets.append(mtp_labels(labels, k, seq_idx))
            aux = aux + aux_terms(self.mtp_moes, input_ids.shape[0], h.device)
            mtp_loads = [total + expert_load(moe.last_routing[1], moe.gate.weight.shape[0])
                         for total, moe in zip(mtp_loads, self.mtp_moes)]
        total, sums = head_losses(hidden, targets, model.lm_head.weight, weights[: self.heads])
        residual = torch.stack(backbone.residual_rms) if backbone.residual_rms else h.new_zeros(0)
        backbone.residual_rms = None
        return {
            "loss": total + weights[self.heads] * aux,
            "head_sums": sums,
            "aux": aux.detach(),
            "expert_load": torch.stack(loads + mtp_loads) if loads or mtp_loads else h.new_zeros(0, 0),
            "residual_rms": residual,
        }


def head_losses(hidden: list[torch.Tensor], targets: list[torch.Tensor], lm_head: torch.Tensor, weights: list[float]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's cross-entropy through one fused linear cross-entropy, so lm_head's gradient is assembled once:
    `hidden` (b, t, d) and `targets` (b, t) per head, `weights` the multiplier of each head's summed loss. Returns
    the weighted total and each head's summed loss (heads,), detached."""
    rows = targets[0].numel()
    row_weights = torch.cat([torch.full((rows,), w, device=hidden[0].device) for w in weights])
    total, losses = linear_cross_entropy(torch.cat(hidden).flatten(0, 1), lm_head, torch.cat(targets).flatten(),
                                         row_weights)
    return total, losses.view(len(hidden), -1).sum(1)


def aux_terms(moes: list[LatentMoE], sequences: int, device: torch.device) -> torch.Tensor:
    """The sequence-level aux losses of the last forward of `moes`, summed over layers."""
    return sum((sequence_aux_loss(*moe.last_routing, sequences) for moe in moes), torch.zeros((), device=device))
