"""The model core on its own: initialisation, MoE routing semantics, the MTP unroll, meta builds and dtype casts."""

import math

import torch

import model as n3
from model.moe import LatentMoE


def tiny_config(**overrides) -> n3.ModelConfig:
    return n3.ModelConfig(**{
        "vocab_size": 64, "hidden_size": 32, "pattern": "M*EM-/*E", "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 8, "mamba_head_dim": 4, "mamba_groups": 2,
        "ssm_state_size": 6, "chunk_size": 4, "n_routed_experts": 6, "num_experts_per_tok": 2,
        "moe_intermediate_size": 12, "moe_shared_expert_intermediate_size": 20, "moe_latent_size": 16,
        "routed_scaling_factor": 2.5, "intermediate_size": 24,
    } | overrides)


def test_initialisation():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = n3.build(cfg)
    mamba = model.model.layers[0].mixer
    assert torch.allclose(mamba.A_log, torch.log(torch.arange(1.0, 9.0)))
    assert torch.all(mamba.D == 1)
    dt = torch.nn.functional.softplus(mamba.dt_bias)
    assert torch.all(dt >= cfg.time_step_min * 0.999) and torch.all(dt <= cfg.time_step_max * 1.001)
    bound = 1 / math.sqrt(cfg.mamba_inner) / math.sqrt(cfg.num_layers)  # kaiming-uniform(a=sqrt 5) / sqrt(layers)
    assert mamba.out_proj.weight.abs().max() <= bound
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.003
    assert torch.all(model.model.layers[2].mixer.gate.e_score_correction_bias == 0)
    assert torch.all(model.model.norm_f.weight == 1) and torch.all(mamba.norm.weight == 1)


def naive_moe(moe: LatentMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the LatentMoE equation."""
    gate, experts = moe.gate, moe.experts
    out = []
    for token in x:
        s = torch.sigmoid(gate.weight @ token)
        chosen = torch.topk(s + gate.e_score_correction_bias, gate.top_k).indices
        w = s[chosen] / s[chosen].sum() * gate.scaling
        u = moe.fc1_latent_proj(token)
        routed = sum(wi * (experts.down_proj[e] @ torch.relu(experts.up_proj[e] @ u) ** 2) for wi, e in zip(w, chosen))
        out.append(moe.fc2_latent_proj(routed) + moe.shared_experts(token))
    return torch.stack(out)


def test_moe_matches_the_equation_and_bias_only_selects():
    torch.manual_seed(1)
    moe = n3.build(tiny_config()).model.layers[2].mixer
    x = torch.randn(10, 32)
    with torch.no_grad():
        moe.gate.weight.normal_()
        torch.testing.assert_close(moe(x), naive_moe(moe, x))
        # A large bias on expert 0 makes every token pick it; its weight comes from the unbiased score.
        moe.gate.e_score_correction_bias[0] = 100.0
        scores, chosen, weights = moe.gate(x)
        assert torch.all((chosen == 0).any(-1))
        torch.testing.assert_close(weights.sum(-1), torch.full((10,), 2.5))
        torch.testing.assert_close(moe(x), naive_moe(moe, x))


def test_compiled_moe_gathers_expert_weights_only_for_decode_sized_inputs(monkeypatch):
    """Compiled forwards without gradients gather each token copy's expert weights (decode steps); a validation
    batch, whose gathered copies would be far larger than the experts, and any forward with gradients group rows by
    expert. Both give the equation's result."""
    from model import moe as moe_module

    torch.manual_seed(2)
    moe = n3.build(tiny_config()).model.layers[2].mixer
    per_copy = 2 * 12 * 16 * 4  # up and down of one expert, fp32
    limit = moe_module.GATHER_BYTES // per_copy
    assert not moe.experts.gathers(2)  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert moe.experts.gathers(limit) and not moe.experts.gathers(limit + 1)
        x = torch.randn(10, 32)
        torch.testing.assert_close(moe(x), naive_moe(moe, x))
    assert not moe.experts.gathers(2)  # gradients enabled


def test_mtp_unroll_reuses_one_weight_set():
    torch.manual_seed(2)
    model = n3.build(tiny_config())
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        h = model.model(ids)
        depths = model.mtp_hidden(h, ids, 3)
        # Depth 2 is the MTP block applied to depth 1's output and the embedding of the token two ahead.
        again = model.mtp(depths[0], model.model.embeddings(torch.roll(ids, -2, 1)))
    assert len(depths) == 3 and all(d.shape == (2, 9, 32) for d in depths)
    torch.testing.assert_close(depths[1], again)
    assert sum(1 for name, _ in model.named_parameters() if name.startswith("mtp.") and "eh_proj" in name) == 1


def test_meta_build_allocates_nothing_and_casts_keep_routers_fp32():
    meta = n3.build(tiny_config(), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    half = n3.build(tiny_config(), dtype=torch.bfloat16)
    router = half.model.layers[2].mixer.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    assert half.model.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    assert half(torch.randint(0, 64, (1, 5))).dtype == torch.float32


def test_backward_reaches_every_parameter():
    model = n3.build(tiny_config())
    ids = torch.randint(0, 64, (2, 11))
    h = model.model(ids)
    loss = model.logits(h).mean() + sum(model.logits(d).mean() for d in model.mtp_hidden(h, ids, 2))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
