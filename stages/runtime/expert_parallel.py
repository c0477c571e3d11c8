"""Expert parallelism for training (parallel.expert = E under torchrun, strategy fsdp), as torchtitan and Megatron
lay it out.

The world is a mesh of (world / E) x E ranks: ranks [g E, (g + 1) E) form expert group g, which splits every MoE
layer's routed experts (the main stack's and the MTP block's), rank i of a group holding the i-th contiguous share;
the ranks at the same place in every group hold the same experts and form its expert-data-parallel group. Tokens
travel to their experts and back by all-to-all (model.expert_parallel). The expert weights are DTensors sharded on
the expert dimension over the group, and FSDP2 shards them further over the expert-data-parallel ranks; every other
weight (router, shared expert, latent projections, attention, Mamba, embeddings) stays FSDP2 over the whole world.
Under pipeline parallelism the same holds within each stage: its ranks take the world's place
(stages.runtime.pipeline builds their mesh).

Gradients: the loop scales each rank's loss by the world, which FSDP divides back. An expert's gradient already sums
its own group's tokens (the all-to-all's backward), and the expert-data-parallel reduction adds the other groups'
and divides by their number (world / E), so each expert weight's gradient is scaled by 1 / E in the backward
(ExpertGroup.gradient_scale): divided by the whole world in all. (FSDP2's own divide factor would do it with a
pre-multiplied sum, which gloo lacks.) Expert loads (the bias update, MaxVio)
are counted per rank over its own tokens and summed over the world by the loop, as without expert parallelism.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from model.expert_parallel import ExpertGroup
from model.moe import Experts
from stages.runtime.distributed import World

MESH = ("expert_data", "expert")


def world_expert_mesh(world: World, size: int) -> DeviceMesh:
    """The (world / E, E) mesh; collective."""
    return init_device_mesh(world.device.type, (world.size // size, size), mesh_dim_names=MESH)


def expert_modules(model: nn.Module) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """Keep this rank's share of every MoE layer's experts, as DTensors on the expert dimension of `mesh` (every
    rank holds the same full weights before: the same seed, or the same checkpoint)."""
    experts_mesh = mesh["expert"]
    size, rank = experts_mesh.size(), experts_mesh.get_local_rank()
    group = ExpertGroup(experts_mesh.get_group(), size, gradient_scale=1.0 / size)
    for experts in expert_modules(model):
        for name in ("up_proj", "down_proj"):
            full = getattr(experts, name)
            share = full.shape[0] // size
            local = full.detach()[rank * share : (rank + 1) * share].clone()
            sharded = DTensor.from_local(local, experts_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.parallel = group


def shard_expert_weights(model: nn.Module, mesh: DeviceMesh, policy) -> None:
    """FSDP2 over the expert-data-parallel ranks for every Experts module."""
    from torch.distributed.fsdp import fully_shard

    for experts in expert_modules(model):
        fully_shard(experts, mesh=mesh["expert_data"], mp_policy=policy)


def step_metrics(model: nn.Module, world: World, seconds: float) -> dict:
    """What the step's exchanges did (collective): token copies received per rank over all MoE layers, max over
    mean (1.0: balanced), and the share of the step's wall time this rank spent in forward all-to-alls (the most of
    any rank). Empty without expert parallelism."""
    groups = {id(e.parallel): e.parallel for e in expert_modules(model) if e.parallel is not None}
    if not groups:
        return {}
    received, exchange = map(sum, zip(*(g.take_counters() for g in groups.values())))
    counts = torch.tensor(world.gather(received), dtype=torch.float64)
    mean = counts.mean().item()
    return {"ep_received_max_over_mean": counts.max().item() / mean if mean else 1.0,
            "all_to_all_share": world.max(exchange / seconds) if seconds > 0 else 0.0}
