"""Parameter counts of a model, total and active per token, by block type. Works on the meta device."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from model.hybrid import NemotronH
from model.moe import Experts

BLOCK_LABELS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


@dataclass
class ParamCount:
    total: int = 0
    active: int = 0
    """Parameters that compute one token: one embedding row, every dense weight, its top-k routed experts, lm_head.
    The Nemotron 3 reports count the same way (Nano: 3.2B active, 3.6B with the whole embedding table)."""
    routed: int = 0
    """Routed-expert parameters (main model and MTP): what expert parallelism splits."""
    by_block: dict[str, tuple[int, int]] = field(default_factory=dict)
    """label -> (total, active); labels: embedding, lm_head, mamba, attention, moe, mlp, norm, mtp."""

    def add(self, label: str, module: nn.Module, top_k: int) -> None:
        total = active = routed = 0
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                total += p.numel()
                if isinstance(sub, Experts):
                    routed += p.numel()
                    active += p.numel() * top_k // sub.up_proj.shape[0]
                else:
                    active += p.numel()
        if isinstance(module, nn.Embedding):
            active = module.embedding_dim  # a token reads one row
        t, a = self.by_block.get(label, (0, 0))
        self.by_block[label] = (t + total, a + active)
        self.total += total
        self.active += active
        self.routed += routed

    def without_mtp(self) -> tuple[int, int]:
        """(total, active) of the main model alone."""
        mtp_total, mtp_active = self.by_block.get("mtp", (0, 0))
        return self.total - mtp_total, self.active - mtp_active


def count_parameters(model: NemotronH) -> ParamCount:
    """Count parameters by block type; MTP has its own label and is included in total and active."""
    k = model.config.num_experts_per_tok
    count = ParamCount()
    count.add("embedding", model.model.embeddings, k)
    count.add("lm_head", model.lm_head, k)
    for layer in model.model.layers:
        count.add(BLOCK_LABELS[layer.kind], layer, k)
    count.add("norm", model.model.norm_f, k)
    if model.mtp is not None:
        count.add("mtp", model.mtp, k)
    return count
