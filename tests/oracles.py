"""Random tiny NemotronH models built by transformers, the reference n3 is checked against (dev extra)."""

from __future__ import annotations

import pytest
import torch

BLOCKS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


def random_hf_model(pattern: str = "M*E-", seed: int = 0, **overrides):
    """A transformers NemotronHForCausalLM with every parameter random, norms, D, conv bias and expert bias included,
    and dt biases spread so that some dt fall under the floor."""
    transformers = pytest.importorskip("transformers")
    config = dict(
        vocab_size=96, hidden_size=32, layers_block_type=[BLOCKS[c] for c in pattern],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=6, conv_kernel=4, chunk_size=4,
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, moe_shared_expert_intermediate_size=20,
        moe_latent_size=16, routed_scaling_factor=2.5, intermediate_size=24,
    ) | overrides
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config)).eval()
    model.set_experts_implementation("eager")  # its grouped-mm path rejects tiny bf16 shapes on CPU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("D", "conv1d.bias")):
                p.normal_()
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 3 - 4)
            elif name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2)
            elif name.endswith("gate.weight"):
                p.normal_(std=0.5)
            else:
                p.normal_(std=0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.3)
    return model
