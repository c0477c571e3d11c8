"""Pipeline parallelism for training (parallel.pipeline = P under torchrun), on torch.distributed.pipelining.

The world is a mesh of P x D ranks (D = world / P), the stages outermost: ranks [s D, (s + 1) D) hold stage s, and
the ranks at place d of every stage form pipeline d, which trains on data-parallel rank d's rows. Stage s holds a
contiguous run of the sublayers, cut by count (`stage_spans`: as equal as they split, the earlier stages taking
what is left over); the first also holds the embeddings, the last the final norm, lm_head and the MTP head. A
stage is the training objective itself with the other stages' modules removed (`StageObjective`), so its
parameter names are those of one process: a checkpoint written under one layout loads under any other.

Between stages travel the hidden state, every head's labels (the last stage takes the loss inside its forward,
where FSDP2 has lm_head gathered), the embeddings' output when MTP trains (the MTP head feeds depth k with
emb(t_{i+k}): that output rolled by k) and the documents of packed rows (seq_idx) when there are any. The step's
micro-batches run on the 1F1B schedule: forwards as inputs arrive, then one backward for each forward, gradients
accumulating over the step. With D > 1 each stage is FSDP2 over its D ranks; with parallel.expert = E as well, the
D ranks of a stage split its experts over groups of E (stages.runtime.expert_parallel, on a (D / E) x E mesh of the
stage's ranks).

Loss normalisation stays the loop's (stages.runtime.loop): the last stage weighs each head's summed token losses by
the global counts; a stage's MoE aux loss joins the backward through the stage's output (AuxGradient, as Megatron's
MoEAuxLossAutoScaler), so no stage needs another's routing. The statistics a rank returns (head sums, aux, expert
load, residual RMS) are its own stage's, zeros for the others', and add up over the world.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from kernels.cross_entropy import IGNORE
from model.errors import UserError
from model.hybrid import rms, run_sublayer
from presets.schema import RunConfig, TrainConfig
from stages.runtime import distributed
from stages.runtime.distributed import World
from stages.runtime.expert_parallel import MESH as EXPERT_MESH
from stages.runtime.losses import CausalLMObjective, aux_terms, expert_load, head_losses, mtp_labels

MESH = ("pipeline", "data")


def stage_spans(layers: int, stages: int) -> list[range]:
    """The sublayers of each stage: contiguous, as equal in count as they split, the earlier stages taking the rest
    (the last one also runs lm_head and the MTP head)."""
    base, extra = divmod(layers, stages)
    spans, start = [], 0
    for stage in range(stages):
        end = start + base + (stage < extra)
        spans.append(range(start, end))
        start = end
    return spans


def check_pipeline(cfg: RunConfig, world: World, train: TrainConfig) -> None:
    """parallel.pipeline fits the world, the step's micro-batches and the other parallel degrees."""
    par, size = cfg.parallel, cfg.parallel.pipeline
    if world.size % size:
        raise UserError(f"parallel.pipeline ({size}) must divide the {world.size} processes")
    if par.context > 1:
        raise UserError(f"parallel.pipeline = {size} trains with data and expert parallelism, not context "
                        "parallelism: set parallel.context=1")
    data = world.size // size
    if data > 1 and par.strategy != "fsdp":
        raise UserError(f"parallel.pipeline = {size} over {world.size} processes shards each stage with FSDP2 over "
                        f"its {data} ranks: set parallel.strategy=fsdp (it is {par.strategy})")
    micro_batches = train.global_batch_size // (train.micro_batch_size * data)
    if micro_batches < size:
        raise UserError(f"the 1F1B schedule needs at least as many micro-batches per step as pipeline stages: "
                        f"{micro_batches} (global_batch_size / (micro_batch_size x {data} data-parallel)) < {size}; "
                        "raise train.global_batch_size or lower train.micro_batch_size")


@dataclass(frozen=True)
class PipelineLayout:
    size: int
    """P: the stages."""
    stage: int
    """The stage this rank holds."""
    data_rank: int
    """The pipeline this rank is in: which rows it trains on."""
    data_size: int
    """D: the pipelines (the data-parallel degree)."""
    group: dist.ProcessGroup
    """This rank's pipeline: the P ranks, by stage, that pass activations to each other."""
    data_mesh: DeviceMesh | None
    """The D ranks holding this rank's stage, which FSDP2 shards it over (None when D = 1)."""
    expert_mesh: DeviceMesh | None = None
    """The same ranks as a (D / E) x E mesh that splits the stage's experts (parallel.expert = E > 1), or None."""

    @classmethod
    def setup(cls, cfg: RunConfig, world: World) -> PipelineLayout | None:
        """The layout of parallel.pipeline on this world (collective); None without pipeline parallelism."""
        size = cfg.parallel.pipeline
        if size == 1 or not world.distributed:
            return None
        data, experts = world.size // size, cfg.parallel.expert
        mesh = init_device_mesh(world.device.type, (size, data), mesh_dim_names=MESH)
        expert_mesh = None
        if experts > 1:  # the same ranks again, each stage's as expert-data-parallel x expert
            expert_mesh = init_device_mesh(world.device.type, (size, data // experts, experts),
                                           mesh_dim_names=("pipeline", *EXPERT_MESH))[EXPERT_MESH]
        return cls(size, world.rank // data, world.rank % data, data, mesh["pipeline"].get_group(),
                   mesh["data"] if data > 1 else None, expert_mesh)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1


class AuxGradient(torch.autograd.Function):
    """h as it is; in the backward also the gradient of weight x aux: a stage's aux loss enters the backward with
    its output's gradient, since only the last stage's output is a loss."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.save_for_backward(aux)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.weight), None


class StageObjective(CausalLMObjective):
    """A CausalLMObjective cut to one pipeline stage: the model keeps this stage's modules under their own names
    (`model.model.layers` a ModuleDict of this stage's sublayers by index). `main_moes` and `mtp_moes` keep every
    MoE layer's place, None for another stage's, as the loop's expert loads are laid out.

    forward(*carried) runs one micro-batch: the first stage takes (input_ids, targets[, seq_idx]), the others what
    the stage before returns, (h, targets[, embedded][, seq_idx]), `targets` (b, heads, t) each head's labels and
    `embedded` the embeddings' output, carried when MTP trains. The last stage returns the micro-batch's loss (in eval
    mode the main head's summed token losses), the others what they carry on. `start_step` sets the step's loss
    weights (the loop's) and clears the statistics the forwards add to. The objective's model is cut in place."""

    def __init__(self, objective: CausalLMObjective, layout: PipelineLayout):
        super().__init__(objective.model, objective.mtp_depths)
        model, backbone = self.model, self.model.model
        config = model.config
        self.span = stage_spans(len(backbone.layers), layout.size)[layout.stage]
        self.first, self.last = layout.first, layout.last
        self.main_moes = [moe if int(name) in self.span else None for moe, name in zip(self.main_moes, self.moe_names)]
        self.mtp_moes = self.mtp_moes if self.last else [None] * len(self.mtp_moes)
        self.layer_count, self.experts = len(backbone.layers), config.n_routed_experts
        backbone.layers = nn.ModuleDict({str(i): backbone.layers[i] for i in self.span})
        if not self.first:
            backbone.embeddings = None
        if not self.last:
            backbone.norm_f = model.lm_head = model.mtp = None
        self.start_step([0.0] * (self.heads + 1), torch.device("cpu"))

    def start_step(self, weights: list[float], device: torch.device) -> None:
        self.weights = weights
        moes = len(self.main_moes) + len(self.mtp_moes)
        self.sums = torch.zeros(self.heads + 1, device=device)
        self.load = torch.zeros(moes, self.experts, device=device) if moes else torch.zeros(0, 0, device=device)
        self.rms = torch.zeros(self.layer_count, device=device)

    def carried_shapes(self, example, training: bool) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """What forward takes and returns for micro-batches shaped as `example` (a batches.MicroBatch), as meta
        tensors. The hidden states travel in the dtype of the weights (the stage casts them)."""
        (b, t), d = example.input_ids.shape, self.model.config.hidden_size
        heads = self.heads if training else 1

        def meta(*shape, dtype=torch.long, grad=False):
            return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)

        documents = [meta(b, t)] if example.seq_idx is not None else []
        hidden = [meta(b, t, d, dtype=self.carry_dtype, grad=training)]
        embedded = hidden if self._carries_embeddings(training) else []
        carried = (*hidden, meta(b, heads, t), *embedded, *documents)
        inputs = (meta(b, t), meta(b, heads, t), *documents) if self.first else carried
        return inputs, (meta(dtype=torch.float32, grad=training),) if self.last else carried

    def _carries_embeddings(self, training: bool) -> bool:
        """The embeddings' output travels to the last stage when the MTP head trains on it."""
        return training and self.mtp_depths > 0

    @property
    def carry_dtype(self) -> torch.dtype:
        """The dtype hidden states leave a stage in: its weights' (a norm's, as the routers stay fp32)."""
        return self.model.model.layers[str(self.span[0])].norm.weight.dtype

    def targets(self, labels: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """Each head's labels (b, heads, t) in training, the main head's (b, 1, t) in eval mode."""
        heads = self.heads if self.training else 1
        return torch.stack([mtp_labels(labels, k, seq_idx) for k in range(heads)], dim=1)

    def forward(self, *carried: torch.Tensor):
        carried = list(carried)
        model, backbone = self.model, self.model.model
        carries_embeddings = self._carries_embeddings(self.training)
        if self.first:
            input_ids, targets = carried.pop(0), carried.pop(0)
            h = embedded = backbone.embeddings(input_ids)
        else:
            h, targets = carried.pop(0), carried.pop(0)
            embedded = carried.pop(0) if carries_embeddings else None
        seq_idx = carried.pop(0) if carried else None
        for i in self.span:
            h = run_sublayer(backbone.layers[str(i)], h, None, seq_idx, backbone.checkpointing)
            if self.training:
                self.rms[i] += rms(h)
        if not self.training:
            if self.last:
                return head_losses([backbone.norm_f(h)], [targets[:, 0]], model.lm_head.weight, [1.0])[1][0]
            return tuple(t for t in (h.to(self.carry_dtype), targets, seq_idx) if t is not None)

        aux = self._routing(self.main_moes, h)
        if not self.last:
            h = AuxGradient.apply(h.to(self.carry_dtype), aux, self.weights[-1])
            # The carried embeddings leave as a new tensor (a view, or a cast): never the stage's input itself.
            carried_on = (h, targets, embedded.to(self.carry_dtype).view_as(embedded) if carries_embeddings else None,
                          seq_idx)
            return tuple(t for t in carried_on if t is not None)
        hidden = [backbone.norm_f(h)]
        for k in range(1, self.mtp_depths + 1):
            # Depth k is fed emb(t_{i+k}): the embeddings' output rolled by k (no context parallelism here).
            hidden.append(model.mtp(hidden[-1], torch.roll(embedded, -k, dims=1), seq_idx=seq_idx))
            aux = aux + self._routing(self.mtp_moes, h, offset=len(self.main_moes))
        total, sums = head_losses(hidden, list(targets.unbind(1)), model.lm_head.weight, self.weights[: self.heads])
        self.sums[:-1] += sums
        return total + self.weights[-1] * aux

    def _routing(self, moes: list, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The aux loss of the last forward of this stage's layers among `moes` (differentiable), adding their
        expert loads and the aux value to the step's statistics."""
        own = [moe for moe in moes if moe is not None]
        aux = aux_terms(own, h.shape[0], h.device)
        for j, moe in enumerate(moes):
            if moe is not None:
                self.load[offset + j] += expert_load(moe.last_routing[1], self.experts)
        self.sums[-1] += aux.detach()
        return aux


class PipelineRunner:
    """Runs the step's micro-batches through this rank's stage on the 1F1B schedule (and validation batches
    forward only); times the stage's own computation for the bubble share."""

    def __init__(self, objective: nn.Module, layout: PipelineLayout, world: World):
        self.objective, self.layout, self.world = objective, layout, world
        self.stage_objective: StageObjective = distributed.unwrap(objective)
        self._schedule, self._evaluators = None, {}
        self.busy, self.seconds = 0.0, 0.0

    def step(self, micro_batches: list, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of the step's micro-batches (this pipeline's rows, whole) with the loop's loss
        weights. Returns this rank's statistics: head sums and aux (heads + 1,), expert load, residual RMS."""
        from torch.distributed.pipelining import Schedule1F1B

        stage = self.stage_objective
        stage.start_step(weights, self.world.device)
        if self._schedule is None:  # every step has as many micro-batches, of one shape
            self._schedule = Schedule1F1B(self._stage(micro_batches[0], training=True), len(micro_batches),
                                          loss_fn=_the_loss, scale_grads=False)
        tick = time.perf_counter()
        self._run(self._schedule, micro_batches)
        self.seconds += time.perf_counter() - tick
        return stage.sums, stage.load, stage.rms

    @torch.no_grad()
    def evaluate(self, batch, labels: torch.Tensor) -> torch.Tensor:
        """The main head's summed token losses and the valid-label count of one validation micro-batch, on the
        last stage's ranks (zeros on the others, so the totals add up over the world)."""
        from torch.distributed.pipelining import ScheduleGPipe

        shape = tuple(batch.input_ids.shape)
        if shape not in self._evaluators:  # a stage runs one shape
            self._evaluators[shape] = ScheduleGPipe(self._stage(batch, training=False), 1, loss_fn=_the_loss)
        losses = self._run(self._evaluators[shape], [dataclasses.replace(batch, labels=labels)], evaluating=True)
        if not self.layout.last:
            return torch.zeros(2, device=self.world.device)
        return torch.stack([losses[0], (labels != IGNORE).sum().to(losses[0])])

    def take_bubble_share(self) -> float:
        """The share of the pipeline steps' wall time since the last call this rank did not compute (waiting for
        activations or gradients), the mean over ranks (collective)."""
        share = 1 - self.busy / self.seconds if self.seconds else 0.0
        self.busy = self.seconds = 0.0
        return sum(self.world.gather(share)) / self.world.size

    def _stage(self, example, training: bool):
        """This rank's PipelineStage for micro-batches shaped as `example`; timed in training. The shapes of what it
        takes and returns are given (torch's inference of them would run the forward on uninitialised inputs)."""
        from torch.distributed.pipelining import PipelineStage

        inputs, outputs = self.stage_objective.carried_shapes(example, training)
        stage = PipelineStage(self.objective, self.layout.stage, self.layout.size, self.world.device,
                              input_args=inputs, output_args=outputs, group=self.layout.group)
        if training:
            for name in ("forward_one_chunk", "backward_one_chunk"):
                setattr(stage, name, self._timed(getattr(stage, name)))
        return stage

    def _timed(self, work):
        def timed(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - tick

        return timed

    def _run(self, schedule, micro_batches: list, evaluating: bool = False) -> list[torch.Tensor]:
        """One schedule step over `micro_batches`; the last stage's per-micro-batch outputs. The batch enters at the
        first stage and the labels are the last's target; the stages between take only what the one before sends."""
        layout, run = self.layout, schedule.eval if evaluating else schedule.step
        if not (layout.first or layout.last):
            run(return_outputs=False)
            return []
        device = self.world.device
        labels = torch.cat([mb.labels for mb in micro_batches]).to(device)
        seq_idx = None if micro_batches[0].seq_idx is None else torch.cat([mb.seq_idx for mb in micro_batches]).to(device)
        targets = self.stage_objective.targets(labels, seq_idx)
        inputs = []
        if layout.first:
            ids = torch.cat([mb.input_ids for mb in micro_batches]).to(device)
            inputs = [ids, targets] + ([seq_idx] if seq_idx is not None else [])
        losses: list[torch.Tensor] = []
        run(*inputs, target=targets if layout.last else None, losses=losses if layout.last else None,
            return_outputs=False)
        return losses


def _the_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward already returns the micro-batch's loss."""
    return output


def gather_stages(state: dict[str, torch.Tensor], layout: PipelineLayout | None) -> dict[str, torch.Tensor]:
    """The whole model's state on global rank 0, in CPU memory, from each stage's full state (FSDP2's full state
    dict without CPU offload, which every rank of a stage holds); collective over the first pipeline. Other ranks
    get `state` back."""
    if layout is None or layout.data_rank != 0:
        return state
    state = {name: tensor.cpu() for name, tensor in state.items()}
    parts = [None] * layout.size if layout.first else None
    dist.gather_object(state, parts, dst=dist.get_global_rank(layout.group, 0), group=layout.group)
    return {k: v for part in parts for k, v in part.items()} if layout.first else state
