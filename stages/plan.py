"""The plan of a run, computed without allocating: the model is built on the meta device.

Every stage's --dry-run prints it: parameter counts (total, active, by block type), the size of the weights in each
precision, the format each GEMM runs in under the preset's low-precision recipe, the parallel layout, and the model
state (weights, gradients, optimizer) each device holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from model import lowp
from model.hybrid import build
from model.params import ParamCount, count_parameters
from presets.schema import RunConfig

BITS = {"fp32": 32, "bf16": 16, "fp8": 8, "nvfp4": 4.5}
"""Stored bits per weight; NVFP4 is 4 bits plus one 8-bit scale per 16 elements."""


@dataclass
class Plan:
    config: RunConfig
    params: ParamCount
    weight_bytes: dict[str, int]
    """Bytes of all weights (MTP included) stored in each precision."""
    gemm_formats: dict[str, int]
    """Parameters of the Linear and routed-expert modules by the format their GEMMs run in (nvfp4, mxfp8, fp8, bf16);
    empty when precision.compute is not a low-precision format."""
    layout: dict[str, int]
    """world, data, tensor, pipeline, expert, context degrees."""
    grad_accumulation: int
    """Micro-batches per optimizer step on each data-parallel rank."""
    params_per_device: int
    """Parameters whose training state one device holds after tensor, pipeline, expert and FSDP sharding."""
    state_bytes_per_device: int
    """Weights, gradients and two Adam moments on one device; activations come on top."""


def plan_run(cfg: RunConfig) -> Plan:
    """The plan of `cfg` (whose layout the preset loader has checked)."""
    model = build(cfg.model, device="meta")
    params = count_parameters(model)
    gemm_formats: dict[str, int] = {}
    for name, fmt in lowp.plan(model, cfg.precision).items():
        gemm_formats[fmt] = gemm_formats.get(fmt, 0) + sum(p.numel() for p in model.get_submodule(name).parameters())
    par, train = cfg.parallel, cfg.train
    # Tensor and pipeline parallelism split everything; expert parallelism splits the routed experts; FSDP then
    # shards dense weights over the data-parallel ranks and experts over the ranks that hold the same experts.
    dense_shards = par.tensor * par.pipeline
    routed_shards = dense_shards * par.expert
    if par.strategy == "fsdp":
        dense_shards *= par.data
        routed_shards *= par.data // par.expert
    per_device = (params.total - params.routed) / dense_shards + params.routed / routed_shards
    param_bytes = BITS[cfg.precision.params] / 8
    state_bytes = per_device * (2 * param_bytes + 8)  # weights + gradients in the params dtype, Adam moments in fp32
    return Plan(
        config=cfg,
        params=params,
        weight_bytes={name: int(params.total * bits / 8) for name, bits in BITS.items()},
        gemm_formats=gemm_formats,
        layout={
            "world": par.world_size, "data": par.data, "tensor": par.tensor,
            "pipeline": par.pipeline, "expert": par.expert, "context": par.context,
        },
        grad_accumulation=train.global_batch_size // (train.micro_batch_size * par.data),
        params_per_device=int(per_device),
        state_bytes_per_device=int(state_bytes),
    )

