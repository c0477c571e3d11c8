"""ModelConfig: the shape of a hybrid Mamba-2 / attention / LatentMoE model with MTP heads.

Field names follow Hugging Face NemotronH where one exists, so a config reads like the checkpoints it maps to.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_CHARS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


@dataclass
class ModelConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    pattern: str = "M*E-"
    """One character per pre-norm residual sublayer: M Mamba-2, * attention, E MoE, - dense MLP.
    A "/" introduces the MTP block pattern (Megatron convention), e.g. "MEM*E/*E"."""
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_groups: int = 8
    """B/C groups; head h reads group h // (mamba_num_heads / mamba_groups)."""
    ssm_state_size: int = 128
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    """Lower bound of the initial dt (the init, not the forward)."""
    dt_floor: float = 0.001
    """Forward clamp dt >= dt_floor. HF NemotronH clamps at time_step_min; Megatron and mamba_ssm use 0."""
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 1024
    moe_shared_expert_intermediate_size: int = 2048
    moe_latent_size: int = 0
    """Width routed experts run in (LatentMoE); 0 means none: experts run at hidden_size."""
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    intermediate_size: int = 4096
    """Width of the dense relu^2 MLP sublayers ("-")."""
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    max_position_embeddings: int = 4096
    """Context length the model is trained for; positions are NoPE, so it bounds caches, not weights."""

    def __post_init__(self) -> None:
        self.validate()

    # --- derived shape -------------------------------------------------------------------------------------
    @property
    def main_pattern(self) -> str:
        return self.pattern.split("/", 1)[0]

    @property
    def mtp_pattern(self) -> str:
        """Pattern of the (single, recursively applied) MTP block; empty when the model has none."""
        parts = self.pattern.split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def num_layers(self) -> int:
        return len(self.main_pattern)

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.mamba_groups * self.ssm_state_size

    @property
    def expert_width(self) -> int:
        return self.moe_latent_size or self.hidden_size

    def context_parallel_problem(self, ranks: int) -> str | None:
        """Why the Mamba-2 layers cannot run context-parallel over `ranks` ranks (each scans the whole sequence for an
        equal share of the heads, see model.context), or None when they can."""
        if "M" not in self.pattern or ranks == 1:
            return None
        if self.mamba_num_heads % ranks:
            return (f"parallel.context ({ranks}) must divide model.mamba_num_heads ({self.mamba_num_heads}): each "
                    "context-parallel rank scans the whole sequence for an equal share of the Mamba heads")
        if self.mamba_groups % ranks and ranks % self.mamba_groups:
            return (f"parallel.context ({ranks}) and model.mamba_groups ({self.mamba_groups}) must divide one "
                    "another: each context-parallel rank takes whole B/C groups, or shares one with its neighbours")
        return None

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        parts = self.pattern.split("/")
        if len(parts) > 2:
            raise ValueError(f"pattern {self.pattern!r}: at most one '/' (the MTP block is one weight set)")
        bad = sorted({c for c in self.pattern.replace("/", "") if c not in BLOCK_CHARS})
        if bad or not self.main_pattern:
            raise ValueError(f"pattern {self.pattern!r}: use only M * E - (and one '/'), got {bad or 'nothing'}")
        if len(parts) == 2 and not parts[1]:
            raise ValueError(f"pattern {self.pattern!r}: nothing after '/'")
        uses = set(self.pattern)
        if "*" in uses and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if "M" in uses and self.mamba_num_heads % self.mamba_groups:
            raise ValueError("mamba_num_heads must be a multiple of mamba_groups")
        if "E" in uses and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError("num_experts_per_tok must be between 1 and n_routed_experts")
        for name in ("vocab_size", "hidden_size", "chunk_size", "conv_kernel"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
