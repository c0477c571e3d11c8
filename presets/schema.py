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
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "train.decay_shape": ("linear", "cosine", "sqrt"),
    **{f"kernels.{op}": names for op, names in KERNEL_CHOICES.items()},
    "sft.train_on": ("assistant", "final", "all"),
    "sft.train.decay_shape": ("linear", "cosine", "sqrt"),
    "rlvr.train.decay_shape": ("linear", "cosine", "sqrt"),
    "rlvr.advantage": ("grpo", "dr_grpo", "loo"),
    "rlvr.normalisation": ("token", "sequence"),
    "rlvr.isolation": ("auto", "namespaces", "process"),
    "mopd.isolation": ("auto", "namespaces", "process"),
    "mopd.train.decay_shape": ("linear", "cosine", "sqrt"),
    "mopd.warmup.decay_shape": ("linear", "cosine", "sqrt"),
    "mopd.behaviour_correction": ("cap", "mask"),
    "mtp_boost.train.decay_shape": ("linear", "cosine", "sqrt"),
    "mtp_boost.inputs": ("mixing", "recursion"),
    "serve.dtype": ("auto", "fp32", "bf16"),
    "serve.ssm_cache_dtype": ("fp32", "bf16", "fp16"),
}


# The Nemotron 3 Super/Ultra NVFP4 recipe (REFERENCE.md section 3), as module-name patterns on n3's (= transformers 5)
# module names. Embeddings and routers are not GEMM modules and always stay in high precision.
RECIPE_BF16_MODULES = [
    "lm_head",  # the output layer and the embeddings stay BF16
    "mtp.*",  # the MTP head: its loss is a small signal next to the main loss
    "*.mixer.q_proj", "*.mixer.k_proj", "*.mixer.v_proj", "*.mixer.o_proj",  # attention: few FLOPs, sensitive
    "*.mixer.fc1_latent_proj", "*.mixer.fc2_latent_proj",  # LatentMoE projections: every token passes through them
]
RECIPE_FP8_MODULES = ["*.mixer.out_proj"]  # Mamba out_proj in MXFP8 (Super): its inputs carry outliers FP4 clips


@dataclass
class PrecisionConfig:
    params: str = "fp32"
    """Master weights and optimizer state dtype: fp32 | bf16."""
    compute: str = "fp32"
    """Matmul precision: fp32 | bf16 (autocast) | fp8 | nvfp4. fp8 and nvfp4 convert the model with model.lowp."""
    bf16_modules: list[str] = field(default_factory=lambda: list(RECIPE_BF16_MODULES))
    """Module-name patterns (fnmatch, e.g. "*.mixer.q_proj") kept in high precision when compute is fp8 or nvfp4."""
    fp8_modules: list[str] = field(default_factory=lambda: list(RECIPE_FP8_MODULES))
    """Module-name patterns run in MXFP8 when compute is nvfp4 (under fp8 every converted module is FP8)."""
    bf16_last_layers: float = 0.15
    """Fraction of the final sublayers kept in high precision when compute is fp8 or nvfp4, rounded down
    (Nemotron 3 Ultra: 16 of 108)."""


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
    reduce_dtype: str = "fp32"
    """Dtype gradients are averaged across data-parallel ranks in: fp32 | bf16 (half the traffic)."""
    output_grad_fp32: bool = True
    """Average the output layer's gradients (lm_head, with the embedding and final norm under FSDP) in fp32 whatever
    reduce_dtype says: with them in bf16 the small MTP contribution to lm_head's gradient is lost, which caused the
    Nemotron 3 Ultra report's first divergence."""

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
    steps: int = 1000
    """Optimizer steps of the run (ignored when `tokens` is set)."""
    tokens: int = field(default=0, metadata={"min": 0})
    """Token budget; when above 0 the run takes ceil(tokens / (global_batch_size x seq_len)) steps."""
    lr: float = 3e-4
    """Peak learning rate, held through the stable phase of the Warmup-Stable-Decay schedule."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = field(default=100, metadata={"min": 0})
    """Linear warmup from 0 to lr."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which lr decays to min_lr."""
    decay_shape: str = "sqrt"
    """Shape of the decay: linear | cosine | sqrt (1 - sqrt of the progress, the WSD papers' choice)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of the parameters not matched by no_decay."""
    no_decay: str = "*norm*.weight,*bias,*.A_log,*.D"
    """Comma-separated fnmatch patterns of parameter names trained without weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    mtp_depths: int = field(default=2, metadata={"min": 0})
    """MTP depths trained (the one MTP weight set applied recursively); 0 trains the main head only."""
    mtp_loss_scale: float = 0.3
    """Total weight of the MTP losses, shared equally by the depths (0.3 / 2 each, as Nemotron 3)."""
    aux_loss_coeff: float = 1e-4
    """Coefficient of the sequence-level MoE load-balancing loss."""
    bias_update_rate: float = 1e-3
    """Aux-loss-free balancing: each step, expert bias += rate * sign(mean load - load)."""
    eval_interval: int = 100
    """Steps between validation passes (one more runs at the end)."""
    eval_sequences: int = 32
    """Validation sequences per pass (fewer when the validation split is smaller)."""
    checkpoint_interval: int = 500
    """Steps between checkpoints (one more is written at the end)."""
    keep_checkpoints: int = field(default=3, metadata={"min": 0})
    """Checkpoints kept in the run folder, the newest; 0 keeps all."""
    seed: int = field(default=0, metadata={"min": 0})
    maxvio_warn: float = 6.0
    """Warn when a MoE layer's MaxVio (max expert load / mean load) exceeds this."""
    residual_jump_warn: float = 2.0
    """Warn when a layer's residual RMS exceeds this multiple of its running average."""
    peak_tflops: float = field(default=0.0, metadata={"min": 0})
    """Peak dense TFLOP/s of one device, for the MFU estimate; 0 looks the GPU up or measures the CPU's matmul."""
    compile: bool = False
    """torch.compile each block of the model (Mamba, attention, MLP, LatentMoE); trains eagerly, with a note,
    where torch.compile cannot build code (on CPU it needs a C++ compiler)."""
    activation_checkpointing: bool = False
    """Keep only each sublayer's input for the backward and recompute the rest there: activation memory falls to
    one hidden state per sublayer and token, for one more forward of compute."""


@dataclass
class DataConfig:
    path: str = ""
    """A corpus folder prepared by `n3 data`; empty: the built-in corpus, prepared on first use."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) instead of training every weight; merged into a plain checkpoint at each save."""

    rank: int = field(default=0, metadata={"min": 0})
    """Adapter rank; 0 trains every weight (full fine-tuning)."""
    alpha: float = 16.0
    """Scale of the adapters' output: alpha / rank."""
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mamba", "shared_experts"])
    """Where adapters go: attention (q/k/v/o_proj), mamba (in_proj, out_proj), shared_experts (the MoE blocks'
    shared expert), mlp (dense MLP blocks), latent (the LatentMoE projections), or a module-name suffix such as
    "mixer.q_proj". The MTP block's modules of those kinds get adapters too."""


def _sft_train() -> TrainConfig:
    """SFT's optimisation defaults: NeMo-RL's SFT recipe (lr 5e-6, weight decay 0.1, betas 0.9 / 0.98) with the MTP
    loss kept as Nemotron 3 Ultra's SFT keeps it (2 depths, 0.1 in all), on packed rows of 4096 tokens."""
    return TrainConfig(seq_len=4096, micro_batch_size=1, global_batch_size=64, steps=1000, lr=5e-6, min_lr=5e-7,
                       warmup_steps=10, decay_fraction=0.9, decay_shape="cosine", adam_beta2=0.98,
                       mtp_loss_scale=0.1, eval_interval=100, checkpoint_interval=200, keep_checkpoints=2)


@dataclass
class SFTConfig:
    """`n3 sft`: chat fine-tuning (REFERENCE.md section 4)."""

    train: TrainConfig = field(default_factory=_sft_train)
    """The optimisation table (as pretraining's [train]) with SFT's own defaults."""
    epochs: float = field(default=0.0, metadata={"min": 0})
    """Passes over the packed training rows; above 0 it sets the number of steps (train.steps is then ignored)."""
    train_on: str = "assistant"
    """Tokens that take a loss: assistant (every assistant turn) | final (the last assistant turn) | all."""
    reasoning_loss: bool = True
    """Train the reasoning of assistant turns (false: only what follows `</think>`)."""
    reasoning_off: float = 0.10
    """Share of conversations with reasoning trained with it stripped (`<think></think>`: reasoning off)."""
    reasoning_truncated: float = 0.03
    """Share trained with the last reasoning trace cut at a random budget, its closing `</think>` not trained."""
    tasks: list[str] = field(default_factory=lambda: ["math", "code", "instructions"])
    """Built-in verifiable tasks (stages/envs) trained on without --data, and evaluated before and after: a domain,
    or DOMAIN:LEVELS with LEVELS a level or a range ("math:1-3")."""
    problems: int = 3000
    """Training problems per built-in domain."""
    eval_problems: int = 100
    """Held-out problems per domain for the accuracy table before and after (greedy, reasoning on and off)."""
    eval_max_tokens: int = 256
    """Tokens a reply may take in that evaluation (reasoning included)."""
    val_fraction: float = 0.02
    """Share of --data conversations held out (by a hash of their first user turn) for the validation loss."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def _rlvr_train() -> TrainConfig:
    """RLVR's optimisation defaults: Nemotron 3 Ultra's student RLVR (lr 4e-6 held constant, no warmup, one optimizer
    step per rollout batch), on rows of 4096 tokens that samples are packed into. RL trains the main head only:
    mtp_*, aux_loss_coeff, global_batch_size and eval_sequences of this table are not used (the rollouts make the
    batch)."""
    return TrainConfig(seq_len=4096, micro_batch_size=1, global_batch_size=1, steps=200, lr=4e-6, min_lr=4e-6,
                       warmup_steps=0, decay_fraction=0.0, adam_beta2=0.999, weight_decay=0.0, mtp_depths=0,
                       checkpoint_interval=50, keep_checkpoints=2)


@dataclass
class RolloutConfig:
    """What the stages that learn from the policy's own samples share (`n3 rlvr`, `n3 mopd`): the environments their
    prompts come from, how the engine samples, the code sandbox, the held-out evaluation."""

    envs: list[str] = field(default_factory=lambda: ["math", "code", "instructions"])
    """Environments trained together: a built-in domain with optional levels ("math:1-2"), DOMAIN=FILE.jsonl (user
    rows scored by that domain's checker), or package.module:Class."""
    weights: list[float] = field(default_factory=list)
    """Share of each environment's prompts, in the order of envs; empty: equal."""
    prompts_per_step: int = 32
    """Prompts per rollout batch."""
    group_size: int = 8
    """Samples per prompt."""
    max_tokens: int = 1024
    """Tokens a reply may take, reasoning included."""
    reasoning: bool = True
    """Sample with reasoning on (the template's enable_thinking); false trains answers without a thought."""
    max_thinking_tokens: int = field(default=0, metadata={"min": 0})
    """Reasoning budget of the rollouts (the engine ends the thought after it); 0: no budget."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = field(default=0, metadata={"min": 0})
    engine_batch: int = 128
    """Requests the in-process engines decode together."""
    isolation: str = "auto"
    """Code sandbox: auto (namespaces where the machine has them) | namespaces | process (rlimits only)."""
    allow_weak_isolation: bool = False
    """Let code run with process isolation only where namespaces are unavailable (otherwise code refuses)."""
    sandbox_workers: int = 4
    """Programs run at once when scoring code."""
    eval_problems: int = 100
    """Held-out problems per built-in domain for the accuracy before and after (greedy, reasoning on and off)."""
    eval_max_tokens: int = 256


@dataclass
class RLVRConfig(RolloutConfig):
    """`n3 rlvr`: reinforcement learning with verifiable rewards, GRPO family (REFERENCE.md section 4). Prompts per
    step: Ultra 512; samples per prompt, the group its advantages are taken in: Ultra 16."""

    train: TrainConfig = field(default_factory=_rlvr_train)
    """The optimisation table: lr and schedule, clipping, steps (one per rollout batch), seq_len (the rows rollouts
    are packed into), micro_batch_size (rows per forward), checkpoints, seed."""
    advantage: str = "grpo"
    """grpo: (r - mean) / (std + eps) per group | dr_grpo: r - mean | loo: leave-one-out."""
    normalisation: str = "token"
    """Loss over the global batch's tokens (token) or the mean over sequences of their token means (sequence)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    """DAPO's clip-higher; set equal to clip_low for the symmetric PPO clip."""
    kl_coeff: float = field(default=0.0, metadata={"min": 0})
    """KL to the frozen starting policy (k3, against its whole distribution at the sampling temperature: no top-k or
    top-p); 0 loads no reference."""
    tis_cap: float = field(default=0.0, metadata={"min": 0})
    """Truncated importance sampling against the engine's log-probs, weight min(pi_learner / pi_engine, cap); 0: off."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal (they carry no advantage: DAPO's dynamic sampling)."""
    overlong_buffer: int = field(default=0, metadata={"min": 0})
    """DAPO's soft overlong punishment over the last this-many tokens before max_tokens; 0: off."""
    updates_per_batch: int = 1
    """Optimizer steps on each rollout batch: 1 is on-policy; more reuse it against the policy that sampled it."""
    server: str = ""
    """An OpenAI-compatible n3 serve URL to generate on instead of in-process; it reloads the learner's weights
    after every step (/update_weights_from_disk)."""
    eval_interval: int = field(default=0, metadata={"min": 0})
    """Steps between held-out evaluations during the run (mean accuracy, reasoning on); 0: before and after only."""


def _mopd_train() -> TrainConfig:
    """MOPD's optimisation defaults: Nemotron 3 Ultra's (lr 2e-6 held constant, one optimizer step per rollout
    batch, main head only), on rows of 4096 tokens that samples are packed into. As for RLVR, the rollouts make the
    batch: global_batch_size, mtp_* and eval_sequences of this table are not used."""
    return TrainConfig(seq_len=4096, micro_batch_size=1, global_batch_size=1, steps=200, lr=2e-6, min_lr=2e-6,
                       warmup_steps=0, decay_fraction=0.0, adam_beta2=0.999, weight_decay=0.0, mtp_depths=0,
                       checkpoint_interval=50, keep_checkpoints=2)


def _mopd_warmup() -> TrainConfig:
    """The warmup SFT on the teachers' replies: short, at a constant SFT learning rate, no MTP loss."""
    return TrainConfig(seq_len=4096, micro_batch_size=1, global_batch_size=16, steps=20, lr=5e-6, min_lr=5e-6,
                       warmup_steps=0, decay_fraction=0.0, mtp_depths=0, eval_interval=1000, checkpoint_interval=1000,
                       keep_checkpoints=1)


@dataclass
class MOPDConfig(RolloutConfig):
    """`n3 mopd`: multi-teacher on-policy distillation (REFERENCE.md section 4): each domain's teacher scores the
    student's own samples token by token; decoupled PPO with a bounded-staleness asynchronous pipeline. Each
    domain needs a teacher; `weights` are the domains' lambdas. Prompts per step: Ultra 1024; one sample per prompt
    (the teacher's token-level signal needs no group baseline)."""

    prompts_per_step: int = 64
    group_size: int = 1
    train: TrainConfig = field(default_factory=_mopd_train)
    """The distillation's optimisation table (steps per cycle, one per rollout batch; lr; seq_len of packed rows)."""
    warmup: TrainConfig = field(default_factory=_mopd_warmup)
    """The warmup SFT's table (steps: --warmup-steps, per cycle; 0 skips the warmup)."""
    teachers: list[str] = field(default_factory=list)
    """DOMAIN=SOURCE, SOURCE a checkpoint (scored in this process) or an OpenAI-compatible server's URL (prompt
    log-probs through /v1/completions with echo); empty: the newest `n3 rlvr --env DOMAIN` run of each domain."""
    clip: float = 0.2
    """The surrogate's clip: r_t in [1 - clip, 1 + clip]."""
    behaviour_cap: float = 5.0
    """The behaviour correction c_t = pi_prox / pi_behav is capped here (AReaL: 5)."""
    behaviour_correction: str = "cap"
    """cap: c_t = min(c_t, behaviour_cap) | mask: tokens whose c_t exceeds the cap take no loss."""
    orm_weight: float = field(default=0.0, metadata={"min": 0})
    """Outcome-reward mixing: this times the environment's reward, less the step's mean for the domain, is added to
    every token's advantage; 0: the teachers' signal alone."""
    max_staleness: int = field(default=2, metadata={"min": 0})
    """Policy versions a rollout's behaviour policy may lag the learner (AReaL: 2-8); 0 is synchronous."""
    asynchronous: bool = True
    """Generation, teacher scoring and updates run concurrently; false runs them one after another."""
    stage_threads: int = field(default=0, metadata={"min": 0})
    """On a CPU, the intra-op threads of each concurrent stage; 0: half of torch's threads (two busy stages share
    the cores instead of oversubscribing them)."""
    cycles: int = field(default=1, metadata={"min": 1})
    """Warmup and distillation repeated with the same teachers."""
    warmup_prompts: int = 256
    """Prompts per domain the teachers answer for the warmup SFT (their replies the environment passes)."""


def _mtp_boost_train() -> TrainConfig:
    """MTP boosting's optimisation defaults (Nemotron 3 Ultra: GBS 64, replies of up to 8K tokens): mtp_depths is
    N, the depths distilled; mtp_loss_scale, aux of the backbone and eval_sequences are not used."""
    return TrainConfig(seq_len=8192, micro_batch_size=1, global_batch_size=64, steps=1000, lr=1e-5, min_lr=1e-6,
                       warmup_steps=20, decay_fraction=0.2, weight_decay=0.0, mtp_depths=7, eval_interval=1000,
                       checkpoint_interval=200, keep_checkpoints=2)


@dataclass
class MTPBoostConfig:
    """`n3 mtp-boost`: the MTP head alone distilled from its frozen model's next-token distributions on the model's
    own replies, so that speculative decoding accepts longer drafts (REFERENCE.md section 4, MTP boosting)."""

    train: TrainConfig = field(default_factory=_mtp_boost_train)
    """The optimisation table; its mtp_depths is N, the depths distilled (1 to 7)."""
    temperature: float = 2.0
    """T: both distributions are softened by it, and the loss scaled by T^2 (0 < T <= 10)."""
    inputs: str = "mixing"
    """Depth k's input: mixing (each token draws the backbone's state or one of depths 1..k-1's, Megatron's
    mtp_hsm) | recursion (depth k - 1's output, as the engine drafts)."""
    envs: list[str] = field(default_factory=lambda: ["math", "code", "instructions"])
    """Where the prompts come from, as rlvr.envs (--data: a chat dataset's prompts instead)."""
    weights: list[float] = field(default_factory=list)
    """Each environment's share of the prompts, in the order of envs; empty: equal."""
    prompts: int = 4096
    """Training prompts the model replies to, once each, at temperature 1."""
    max_tokens: int = 1024
    """Tokens per reply."""
    reasoning: bool = True
    val_fraction: float = 0.05
    """Share of a --data set's conversations held out (by a hash of the prompt) for the evaluation."""
    eval_prompts: int = 64
    """Held-out prompts: the replies the KL is measured on, and the acceptance measured from."""
    eval_max_tokens: int = 128
    """Tokens generated per held-out prompt at each draft length."""
    init_pattern: str = "*E"
    """--init: the MTP block built for a checkpoint without one (attention and MoE sublayers only)."""
    engine_batch: int = 128
    """Requests the in-process engine decodes together."""


def _extend_train() -> TrainConfig:
    """The long-context phase's optimisation defaults (Nemotron 3 Ultra: 25,165,824 tokens per iteration at 1M
    tokens, lr 2.5e-6 held constant, no warmup); lr 0 takes the starting pretraining run's min_lr."""
    return TrainConfig(seq_len=1 << 20, micro_batch_size=1, global_batch_size=24, tokens=33_000_000_000, lr=0.0,
                       min_lr=0.0, warmup_steps=0, decay_fraction=0.0, eval_interval=100, checkpoint_interval=100,
                       keep_checkpoints=2)


@dataclass
class ExtendConfig:
    """`n3 extend`: the long-context phase ending pretraining (REFERENCE.md section 2): continued pretraining at
    train.seq_len (the long length), with iterations at short_seq_len mixed in, never within one iteration."""

    train: TrainConfig = field(default_factory=_extend_train)
    """The optimisation table at the long length: its seq_len, micro_batch_size (1 at long lengths) and
    global_batch_size fix the tokens of every iteration; lr 0: the starting run's min_lr, constant."""
    short_seq_len: int = 4096
    """Length of the short iterations (Ultra: 4K); they hold the same tokens in more, shorter rows."""
    short_fraction: float = 0.08
    """Share of the iterations at the short length, spread evenly through the run (Ultra: 8%)."""
    document_masking: bool = True
    """Rows of several documents keep them apart (no attention, conv or scan across a boundary)."""
    data: list[str] = field(default_factory=lambda: ["repository", "retrieval", "corpus"])
    """Sources of the long rows: repository (built in: each standard-library package's files as one document),
    retrieval (built in: synthetic key-value lookups over long filler), corpus (the pretraining corpus packed into
    long rows), or NAME=PATH (text files, a folder of them or jsonl, as `n3 data`)."""
    weights: list[float] = field(default_factory=list)
    """Share of the long rows from each source, in the order of data; empty: equal (Ultra: 46% long-context data,
    54% the pretraining blend's second phase)."""
    context_parallel: int = field(default=0, metadata={"min": 0})
    """Context-parallel degree of this phase (parallel.context while it runs); 0: parallel.context."""
    eval_documents: int = 8
    """Held-out long documents (repository packages no training row draws from) the loss by position is measured
    on, each cut to the long length."""
    ruler_lengths: list[int] = field(default_factory=lambda: [1 << 20])
    """Lengths RULER runs at before and after (niah_single_1, niah_multikey_1, vt)."""
    ruler_samples: int = 100
    """RULER samples per task and length."""
    eval_sequences: int = 64
    """Short-context validation sequences (the corpus' validation split at the starting run's seq_len)."""


@dataclass
class KernelConfig:
    """Backend per hot op: auto picks the fastest installed path for the device, torch forces the reference."""

    ssd: str = "auto"
    conv1d: str = "auto"
    attention: str = "auto"
    moe: str = "auto"
    fp8_gemm: str = "auto"
    """FP8 GEMMs of `precision.compute = "fp8"`: scaled_mm (torch._scaled_mm, CUDA 8.9+) or the fp32 emulation."""


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
    compile: bool = False
    """torch.compile the decode step (done while /health says loading; decoding stays eager if it fails)."""


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
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rlvr: RLVRConfig = field(default_factory=RLVRConfig)
    mopd: MOPDConfig = field(default_factory=MOPDConfig)
    mtp_boost: MTPBoostConfig = field(default_factory=MTPBoostConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
