"""The plan of a run, computed without allocating: the model is built on the meta device.

Every stage's --dry-run prints it: parameter counts (total, active, by block type), the size of the weights in each
precision, the format each GEMM runs in under the preset's low-precision recipe, the parallel layout, the model
state (weights, gradients, optimizer) each device holds, and the activations one micro-batch keeps for its backward.

Activations are counted from what n3's training forward saves per token (see `saved_per_token`; tests compare the
count with the tensors autograd saves on the tiny shape): linear in the tokens a device holds (micro-batch x seq_len
/ context), since attention saves its output and log-sum-exp, not the scores, and the Mamba scan's quadratic terms
stay within a chunk. With activation checkpointing a sublayer keeps its input alone, and the backward holds one
sublayer's full activations at a time on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model import lowp
from model.config import ModelConfig
from model.hybrid import build
from model.moe import Experts
from model.params import ParamCount, count_parameters
from presets.schema import RunConfig
from stages.runtime.pipeline import stage_spans

BITS = {"fp32": 32, "bf16": 16, "fp8": 8, "nvfp4": 4.5}
"""Stored bits per weight; NVFP4 is 4 bits plus one 8-bit scale per 16 elements."""
NORM = 2
"""A pre-norm saves its input and its output, hidden_size elements each."""


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
    tokens_per_device: int
    """Tokens of one micro-batch on one device: micro_batch_size x seq_len / context."""
    activation_bytes: int
    """What one micro-batch's forward keeps for the backward on one device, as the run trains (with or without
    activation checkpointing, train.activation_checkpointing)."""
    activation_bytes_full: int
    """The same without activation checkpointing."""
    activation_bytes_checkpointed: int
    """The same with activation checkpointing per sublayer."""
    runs: list[str]
    """What the trainers do with this layout, a line each: how the experts are split, what is refused."""


def plan_run(cfg: RunConfig) -> Plan:
    """The plan of `cfg` (whose layout the preset loader has checked)."""
    model = build(cfg.model, device="meta")
    params = count_parameters(model)
    gemm_formats: dict[str, int] = {}
    for name, fmt in lowp.plan(model, cfg.precision).items():
        gemm_formats[fmt] = gemm_formats.get(fmt, 0) + sum(p.numel() for p in model.get_submodule(name).parameters())
    par, train = cfg.parallel, cfg.train
    # Tensor parallelism splits everything; pipeline parallelism gives each device one stage's weights (the
    # heaviest stage counts); expert parallelism splits the routed experts; FSDP then shards dense weights over the
    # data- and context-parallel ranks (the ranks of a context-parallel group hold the same weights), and experts
    # over those of them that hold the same experts.
    dense_shards = par.tensor
    routed_shards = dense_shards * par.expert
    if par.strategy == "fsdp":
        dense_shards *= par.data * par.context
        routed_shards *= max(1, par.data * par.context // par.expert)
    per_device = max(dense / dense_shards + routed / routed_shards
                     for dense, routed in stage_parameters(model, par.pipeline))
    param_bytes = BITS[cfg.precision.params] / 8
    state_bytes = per_device * (2 * param_bytes + 8)  # weights + gradients in the params dtype, Adam moments in fp32
    tokens = train.micro_batch_size * train.seq_len // par.context
    accumulation = train.global_batch_size // (train.micro_batch_size * par.data)  # micro-batches a step, per rank
    compute_bytes = 4 if cfg.precision.compute == "fp32" else 2  # fp8 / nvfp4 keep bf16 activations
    full, checkpointed = (compute_bytes * tokens * activations_per_token(cfg.model, train.mtp_depths, recompute)
                          for recompute in (False, True))
    return Plan(
        config=cfg,
        params=params,
        weight_bytes={name: int(params.total * bits / 8) for name, bits in BITS.items()},
        gemm_formats=gemm_formats,
        layout={
            "world": par.world_size, "data": par.data, "tensor": par.tensor,
            "pipeline": par.pipeline, "expert": par.expert, "context": par.context,
        },
        grad_accumulation=accumulation,
        params_per_device=int(per_device),
        state_bytes_per_device=int(state_bytes),
        tokens_per_device=tokens,
        activation_bytes=int(checkpointed if train.activation_checkpointing else full),
        activation_bytes_full=int(full),
        activation_bytes_checkpointed=int(checkpointed),
        runs=_what_runs(cfg, accumulation),
    )


def _what_runs(cfg: RunConfig, accumulation: int) -> list[str]:
    par = cfg.parallel
    lines = []
    if par.expert > 1 and par.strategy == "fsdp":
        lines.append(f"experts: n3 pretrain splits each MoE layer's over groups of {par.expert} ranks (all-to-all) "
                     f"and shards them with FSDP2 over {max(1, par.data * par.context // par.expert)} ranks; the other "
                     "stages shard them with FSDP2 over the world")
    if par.pipeline > 1:
        sizes = [len(span) for span in stage_spans(cfg.model.num_layers, par.pipeline)]
        cut = (f"{par.pipeline} stages of {sizes[0]} sublayers" if len(set(sizes)) == 1
               else f"{par.pipeline} stages of {', '.join(map(str, sizes))} sublayers")
        bubble = (par.pipeline - 1) / (accumulation + par.pipeline - 1)
        lines.append(f"pipeline: n3 pretrain runs {cut} (the first also the embeddings, the last the final norm, "
                     f"lm_head and MTP head), 1F1B over {accumulation} micro-batches a step: {bubble:.1%} of it idle; "
                     "the other stages refuse it")
    refused = [f"parallel.tensor = {par.tensor}"] if par.tensor > 1 else []
    if par.pipeline > 1 and par.context > 1:
        refused.append(f"parallel.pipeline = {par.pipeline} with parallel.context = {par.context}")
    if refused:
        lines.append(f"not trainable yet: {', '.join(refused)} (the trainers refuse it; this plan counts it)")
    return lines


def stage_parameters(model: nn.Module, stages: int) -> list[tuple[int, int]]:
    """(dense, routed-expert) parameters of each pipeline stage (stages.runtime.pipeline.stage_spans): its
    sublayers, the embeddings on the first, the final norm, lm_head and MTP head on the last."""
    spans = stage_spans(len(model.model.layers), stages)
    counts = []
    for stage, span in enumerate(spans):
        modules = [model.model.layers[i] for i in span]
        if stage == 0:
            modules.append(model.model.embeddings)
        if stage == stages - 1:
            modules += [model.model.norm_f, model.lm_head] + ([model.mtp] if model.mtp is not None else [])
        routed = sum(p.numel() for m in modules for e in m.modules() if isinstance(e, Experts) for p in e.parameters())
        counts.append((sum(p.numel() for m in modules for p in m.parameters()) - routed, routed))
    return counts


def saved_per_token(model: ModelConfig, kind: str) -> float:
    """Elements one sublayer of `kind` (a pattern character) saves for its backward per token, its pre-norm included."""
    d, H, G, N, L = (model.hidden_size, model.mamba_num_heads, model.mamba_groups, model.ssm_state_size,
                     model.chunk_size)
    if kind == "M":
        inner, conv = model.mamba_inner, model.mamba_conv_dim
        projections = (inner + conv + H) + inner  # in_proj's output, out_proj's input
        conv_layer = 3 * conv  # the window, the conv's output, SiLU's output
        scan = 5 * inner + 4 * G * N + (2 * H + G) * L + 2 * H * model.mamba_head_dim * N / L
        # x * dt, the decayed in-chunk scores per head and the C.B scores per group (each a chunk wide), the chunk
        # states and the states entering each chunk (one per chunk), the partial outputs; B and C in the chunked form
        return NORM * d + projections + conv_layer + scan + 2 * inner  # the gated norm's input and gate
    if kind == "*":
        q, kv = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
        return NORM * d + q + 2 * kv + 2 * q + model.num_attention_heads  # q, k, v; output and o_proj's input; lse
    if kind == "E":
        latent, k = model.moe_latent_size or d, model.num_experts_per_tok
        routed = k * (2 * latent + 2 * model.moe_intermediate_size)  # per copy: input, up, relu^2, down
        return NORM * d + model.n_routed_experts + 2 * latent + routed + 2 * model.moe_shared_expert_intermediate_size
    return NORM * d + 2 * model.intermediate_size  # "-": the dense MLP's up output and its activation


def activations_per_token(model: ModelConfig, mtp_depths: int, recompute: bool) -> float:
    """Elements one token keeps for the backward: every sublayer, each MTP depth (its sublayers, the eh_proj fusion
    of two normed halves, its final norm), the embedding, the final norm and the hidden the chunked cross-entropy
    reads (logits are never kept whole). With `recompute` a sublayer keeps its input alone, plus the largest
    sublayer's activations, held while the backward recomputes it."""
    d = model.hidden_size
    base = d + NORM * d + d
    sublayers = [saved_per_token(model, kind) for kind in model.main_pattern]
    mtp = [saved_per_token(model, kind) for kind in model.mtp_pattern] if mtp_depths else []
    mtp_extra = 3 * NORM * d + d  # enorm, hnorm, final norm; the hidden its loss reads
    if recompute:
        peak = max(sublayers + mtp)
        return base + d * len(sublayers) + mtp_depths * (mtp_extra + d * len(mtp)) + peak
    return base + sum(sublayers) + mtp_depths * (mtp_extra + sum(mtp))

