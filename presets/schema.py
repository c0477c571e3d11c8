"""The typed tree a preset resolves to. Each TOML table is one dataclass here; a key a dataclass lacks is an error.

Sections belong to the code that reads them: `model` is `model.ModelConfig`; the rest are declared here with their
meaning beside each field, so `n3 presets show` and this file document the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernels.backends import CHOICES as KERNEL_CHOICES
from model.config import ModelConfig

# Fields that take one of a fixed set of values, by dotted key.
CHOICES: dict[str, tuple[str, ...]] = {
    "precision.params": ("fp32", "bf16"),
    "precision.compute": ("fp32", "bf16", "fp8", "nvfp4"),
    "parallel.strategy": ("none", "ddp", "fsdp"),
    **{f"kernels.{op}": names for op, names in KERNEL_CHOICES.items()},
    "serve.dtype": ("auto", "fp32", "bf16"),
    "serve.ssm_cache_dtype": ("fp32", "bf16", "fp16"),
}


@dataclass
class PrecisionConfig:
    params: str = "fp32"
    """Master weights and optimizer state dtype: fp32 | bf16."""
    compute: str = "fp32"
    """Matmul precision: fp32 | bf16 (autocast) | fp8 | nvfp4."""


@dataclass
class ParallelConfig:
    strategy: str = "none"
    """none | ddp | fsdp (FSDP2 fully_shard). Under torchrun the world is nodes x gpus_per_node."""
    nodes: int = 1
    gpus_per_node: int = 1
    tensor: int = 1
    """Tensor-parallel degree (attention heads, Mamba heads, expert width)."""
    pipeline: int = 1
    """Pipeline stages; sublayers are split evenly between them."""
    expert: int = 1
    """Expert-parallel degree: routed experts are split across this many ranks."""
    context: int = 1
    """Context-parallel degree for long sequences."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data(self) -> int:
        """Data-parallel degree: what the world has left after tensor, pipeline and context parallelism."""
        return max(1, self.world_size // (self.tensor * self.pipeline * self.context))


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    """Sequences per device per forward/backward."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all devices; the rest is gradient accumulation."""


@dataclass
class KernelConfig:
    """Backend per hot op: auto picks the fastest installed path for the device, torch forces the reference."""

    ssd: str = "auto"
    conv1d: str = "auto"
    attention: str = "auto"
    moe: str = "auto"


@dataclass
class ServeConfig:
    """The inference engine behind `n3 serve` (model.engine.EngineConfig)."""

    max_batch: int = 16
    """Requests decoded together (cache rows); more wait in a queue."""
    max_len: int = 0
    """Context per request, prompt + generated tokens; 0: the checkpoint's max_position_embeddings."""
    max_step_tokens: int = 0
    """Tokens fed to the model per step (decodes first, prompt chunks fill the rest); 0: 512 more than the decodes."""
    speculative_tokens: int = 0
    """MTP self-speculation: draft tokens per step; 0 is off. Needs a checkpoint with an MTP head."""
    ssm_cache_dtype: str = "fp32"
    """Mamba SSM state cache dtype: fp32 | bf16 | fp16."""
    ssm_stochastic_rounding: bool = True
    """Round a bf16 / fp16 SSM state stochastically (unbiased) instead of to nearest."""
    dtype: str = "auto"
    """Weights and activations: auto (as the checkpoint stores them) | fp32 | bf16."""


@dataclass
class RunConfig:
    name: str = "cpu"
    description: str = ""
    shape: str = "tiny"
    """Model shape preset (presets/shapes/<shape>.toml) whose values fill [model]."""
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
