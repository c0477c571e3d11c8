"""torchrun and torch.distributed: the process group, the device, preparing the model for training (precision, then
DDP or FSDP2), gradient-sync control for accumulation, and the fp32 reduction of the output layer's gradients.

The same code runs in one process (no process group; every collective is a no-op) and under
`torchrun --nproc-per-node N -m n3cli pretrain ...` (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.errors import UserError
from presets.schema import RunConfig, TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def max(self, value: float) -> float:
        """The largest of every rank's value."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def broadcast(self, value: object) -> object:
        """Rank 0's value on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: object) -> list:
        """Every rank's value, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(cfg: RunConfig) -> World:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE set), and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wants_gpu = cfg.precision.compute != "fp32" or cfg.parallel.strategy != "none"
    if torch.cuda.is_available() and (wants_gpu or size > 1):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return World(rank, size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_layout(
    cfg: RunConfig, world: World, train: TrainConfig | None = None, model: ModelConfig | None = None,
    context_parallel: bool = False, expert_parallel: bool = False, pipeline_parallel: bool = False,
) -> None:
    """What this trainer runs: data parallelism (DDP or FSDP2) over all ranks. `context_parallel`: the stage also
    runs parallel.context > 1 (it trains through stages.runtime.context, whose groups of C ranks share each
    sequence); other stages refuse it. `expert_parallel`: the stage splits the experts over parallel.expert ranks
    (stages.runtime.expert_parallel); in other stages FSDP shards experts like any weight. `pipeline_parallel`: the
    stage runs parallel.pipeline > 1 (stages.runtime.pipeline); other stages refuse it. `train` is the stage's
    optimisation table (default: pretraining's [train]), `model` the shape it trains (default: the preset's)."""
    train, model = train or cfg.train, model or cfg.model
    parallel = cfg.parallel
    if expert_parallel and parallel.expert > 1 and world.distributed:
        _check_experts(parallel.expert, cfg, world, model)
    if pipeline_parallel and parallel.pipeline > 1 and world.distributed:
        from stages.runtime.pipeline import check_pipeline

        check_pipeline(cfg, world, train)
    beyond_data = {"context": context_parallel, "pipeline": pipeline_parallel}  # what the stage also trains
    also = "".join(f" and {name}-parallel" for name, trains in beyond_data.items() if trains)
    for key in ("tensor", "pipeline", "context"):
        if getattr(parallel, key) > 1 and not beyond_data.get(key):
            raise UserError(f"parallel.{key} = {getattr(parallel, key)}: this stage trains data-parallel (DDP or "
                            f"FSDP2){also} only; set parallel.{key}=1")
    if cfg.precision.compute == "bf16" and world.device.type != "cuda":
        raise UserError("precision.compute = bf16 needs a GPU here; on CPU use precision.compute=fp32")
    context = parallel.context if world.distributed else 1  # one process trains whole sequences
    if context > 1:
        _check_context(context, world, train, model)
    stages = parallel.pipeline if pipeline_parallel and world.distributed else 1
    per_step = train.micro_batch_size * (world.size // (context * stages))
    if train.global_batch_size % per_step:
        raise UserError(
            f"global_batch_size ({train.global_batch_size}) must be a multiple of micro_batch_size x "
            f"data-parallel processes ({train.micro_batch_size} x {world.size // (context * stages)})"
        )
    if world.distributed and parallel.strategy == "none":
        raise UserError(f"{world.size} processes but parallel.strategy = none; set parallel.strategy=ddp or fsdp")


def _check_experts(size: int, cfg: RunConfig, world: World, model: ModelConfig) -> None:
    """parallel.expert = `size` fits the strategy, the world and every MoE layer's experts."""
    if cfg.parallel.strategy != "fsdp":
        raise UserError(f"parallel.expert = {size} trains under FSDP2 (the experts over their expert-data-parallel "
                        f"ranks, the rest over the world); set parallel.strategy=fsdp (it is {cfg.parallel.strategy})")
    if world.size % size:
        raise UserError(f"parallel.expert ({size}) must divide the {world.size} processes: expert groups are "
                        f"consecutive ranks of the world")
    if model.n_routed_experts % size:
        raise UserError(f"parallel.expert ({size}) must divide model.n_routed_experts ({model.n_routed_experts}): "
                        "every rank of an expert group holds the same number of experts")


def _check_context(context: int, world: World, train: TrainConfig, model: ModelConfig) -> None:
    """parallel.context = `context` fits the world, the sequences (equal slices) and the Mamba heads."""
    if world.size % context:
        raise UserError(f"parallel.context ({context}) must divide the {world.size} processes")
    if train.seq_len % context:
        raise UserError(f"seq_len ({train.seq_len}) must be a multiple of parallel.context ({context}): each "
                        "context-parallel rank takes an equal slice of every sequence")
    problem = model.context_parallel_problem(context)
    if problem:
        raise UserError(problem)


def autocast(compute: str, world: World):
    """The context of forward passes in `compute` precision (precision.compute): bf16 autocast on GPU (for what
    fp8/nvfp4 leave in high precision too), nothing on CPU (fp32, or fp8/nvfp4 emulated around fp32)."""
    if compute != "fp32" and world.device.type == "cuda":
        return torch.autocast(world.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(
    objective: nn.Module, cfg: RunConfig, world: World, note: Callable[[str], None] = lambda message: None,
    train: TrainConfig | None = None, expert_parallel: bool = False, pipeline=None,
) -> nn.Module:
    """The one place a model becomes trainable: activation checkpointing and per-block compilation as the stage's
    optimisation table says (`train.activation_checkpointing`, `train.compile`; default pretraining's [train]),
    master-weight dtype, then the low-precision converter (fp8, nvfp4: model.lowp, on the unwrapped modules), then
    the compiler, then DDP or FSDP2 (with `expert_parallel` and parallel.expert > 1, the experts split over expert
    groups first: stages.runtime.expert_parallel). With `pipeline` (a stages.runtime.pipeline.PipelineLayout) the
    objective is first cut to this rank's stage, which FSDP2 shards over the stage's ranks. Returns what the loop
    calls; `note` hears what the converter and the compiler did."""
    train = train or cfg.train
    from model.hybrid import cast
    from model.lowp import LOW_PRECISION_COMPUTE, convert
    from stages.runtime.compiling import compile_blocks

    if pipeline is not None:
        from stages.runtime.pipeline import StageObjective

        objective = StageObjective(objective, pipeline)
    objective.to(world.device)
    objective.model.set_activation_checkpointing(train.activation_checkpointing)
    if cfg.precision.params == "bf16":
        cast(objective, torch.bfloat16)
    if cfg.precision.compute in LOW_PRECISION_COMPUTE:
        note(convert(objective.model, cfg.precision).summary())
    if train.compile:
        compile_blocks(objective.model, note)
    if not world.distributed:
        return objective
    if pipeline is not None:
        if pipeline.data_mesh is None:
            return objective
        return _fsdp(objective, cfg, world, mesh=pipeline.data_mesh, expert_mesh=pipeline.expert_mesh)
    if cfg.parallel.strategy == "ddp":
        return _ddp(objective, cfg, world)
    return _fsdp(objective, cfg, world, experts=cfg.parallel.expert if expert_parallel else 1)


def _ddp(objective: nn.Module, cfg: RunConfig, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    reduce_dtype = DTYPES[cfg.parallel.reduce_dtype]
    output = objective.model.lm_head.weight
    separate_output = cfg.parallel.output_grad_fp32 and (reduce_dtype != torch.float32 or output.dtype != torch.float32)
    if separate_output:
        # DDP reduces every bucket with the same hook; the output layer leaves DDP and is averaged in fp32 by
        # reduce_output_gradients after the last micro-batch.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, ["model.lm_head.weight"])
    # The expert biases are updated identically on every rank: no buffer traffic in the forwards.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    wrapped = DistributedDataParallel(
        objective,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
        **({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}),
    )
    if any(p.dtype != reduce_dtype for p in objective.parameters()):
        wrapped.register_comm_hook(None, _reduce_in(reduce_dtype))
    wrapped.n3_separate_output = separate_output
    return wrapped


def _reduce_in(dtype: torch.dtype):
    """A DDP comm hook that averages each bucket in `dtype` (bf16 halves the traffic; fp32 keeps bf16 gradients
    exact)."""

    def hook(state, bucket):
        buffer = bucket.buffer()
        world = dist.get_world_size()
        reduced = buffer.to(dtype).div_(world)
        work = dist.all_reduce(reduced, async_op=True).get_future()

        def back(fut):
            buffer.copy_(fut.value()[0])
            return buffer

        return work.then(back)

    return hook


def _fsdp(objective: nn.Module, cfg: RunConfig, world: World, experts: int = 1, mesh=None, expert_mesh=None
          ) -> nn.Module:
    """FSDP2 over the world (or the ranks of `mesh`); with `experts` > 1 the experts split over groups of that many
    ranks of the world first (or over `expert_mesh`'s, a pipeline stage's)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = torch.bfloat16 if cfg.precision.compute == "bf16" else None
    reduce_dtype = DTYPES[cfg.parallel.reduce_dtype]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    model = objective.model
    if experts > 1 or expert_mesh is not None:
        from stages.runtime.expert_parallel import shard_expert_weights, shard_experts, world_expert_mesh

        expert_mesh = expert_mesh or world_expert_mesh(world, experts)
        shard_experts(model, expert_mesh)
        shard_expert_weights(model, expert_mesh, policy)  # inner units: the layers' units below leave them be
    for layer in model.model.layers.children():  # a ModuleList, or a pipeline stage's ModuleDict
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if model.mtp is not None and any(p.requires_grad for p in model.mtp.parameters()):
        # A frozen MTP head (RL's) runs in no forward: as a unit of its own it would never be gathered, and FSDP2's
        # end of backward fails on it. Left to the root unit, it is gathered with the embeddings.
        fully_shard(model.mtp, mesh=mesh, mp_policy=policy)
    # The root unit holds what the layers do not: embeddings, final norm and the output layer.
    root_reduce = torch.float32 if cfg.parallel.output_grad_fp32 else reduce_dtype
    fully_shard(objective, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=root_reduce))
    return objective


def clip_gradients(params: list[nn.Parameter], max_norm: float, stages: dist.ProcessGroup | None = None
                   ) -> torch.Tensor:
    """torch's clip_grad_norm_, also over gradients on different device meshes (expert parallelism: the experts'
    on the expert mesh, the rest on the world's), whose norms torch cannot stack: each mesh's norm in full, then the
    total; with `stages` (pipeline parallelism: the group of ranks holding the other stages' parameters) over all
    of theirs too. Returns the total norm before clipping."""
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    if len(by_mesh) <= 1 and stages is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [full_tensor(torch.nn.utils.get_total_norm(grads)) for grads in by_mesh.values()]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if stages is not None:
        squared = total.square()
        dist.all_reduce(squared, group=stages)
        total = squared.sqrt()
    scale = min(1.0, max_norm / (total.item() + 1e-6))
    if scale < 1.0:
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, scale)
    return total


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's norms and gradients) as a plain tensor holding all of it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool):
    """Accumulate without communication unless `sync` (the last micro-batch of a step)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
        yield
    elif hasattr(module, "no_sync") and not sync:  # DDP
        with module.no_sync():
            yield
    else:
        yield


def reduce_output_gradients(module: nn.Module, world: World) -> None:
    """Average the output layer's gradient in fp32 where DDP was told to leave it alone."""
    if not getattr(module, "n3_separate_output", False):
        return
    weight = unwrap(module).model.lm_head.weight
    grad = weight.grad.float()
    dist.all_reduce(grad)
    weight.grad.copy_(grad / world.size)
