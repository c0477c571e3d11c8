"""What a request asks for (SamplingParams) and how an engine is sized (EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

LOGPROBS_MODES = ("raw", "processed")


@dataclass
class SamplingParams:
    """Per-request decoding settings, OpenAI-style. Checked by `validate` (ValueError names the field)."""

    max_tokens: int | None = None
    """Tokens to generate at most; None: up to the engine's max_len. 0 is allowed for scoring (prompt_logprobs)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before top-k / top-p."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first occurrence of any of these strings (not included in the text)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation ends after any of these tokens (the token is kept in token_ids, not in the text)."""
    ignore_eos: bool = False
    """Do not stop at the tokenizer's eos (or the chat end token)."""
    logprobs: int | None = None
    """None: no logprobs; N >= 0: each generated token's log-probability and the N most likely alternatives, under
    the distribution logprobs_mode names."""
    logprobs_mode: str = "raw"
    """"raw": the model's own log-softmax, before temperature / top-k / top-p. "processed": the distribution each
    token was drawn from (vLLM's processed_logprobs): logits divided by the temperature, -inf outside top-k and top-p;
    for a speculative step, the target's at each emitted position (what rejection sampling reproduces); for a token
    the thinking budget forced, certainty (log-probability 0). Greedy requests (temperature 0 or top_k 1) report the
    raw distribution, as vLLM does: the one they draw from is a point mass at the argmax."""
    prompt_logprobs: int | None = None
    """As logprobs, for every prompt token after the first: what log-likelihood scoring needs. Always raw."""
    max_thinking_tokens: int | None = None
    """Reasoning budget: after this many reasoning tokens the thought ends at the next newline (see thinking_grace)."""
    thinking_grace: int = 64
    """When no newline comes within this many tokens past the budget, `</think>` is forced anyway."""
    skip_special_tokens: bool = True
    """Leave special tokens (chat markers, <think>) out of the text."""

    def validate(self, vocab_size: int) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be {' or '.join(map(repr, LOGPROBS_MODES))}, got {self.logprobs_mode!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= vocab_size:
                raise ValueError(f"{name} must be between 0 and the vocabulary size ({vocab_size}), got {value}")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids below {vocab_size}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0, got {self.max_thinking_tokens}")
        if self.thinking_grace < 0:
            raise ValueError(f"thinking_grace must be >= 0, got {self.thinking_grace}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class EngineConfig:
    """How much an engine runs at once. Memory: the KV cache is max_batch x max_len per attention sublayer."""

    max_batch: int = 16
    """Requests decoded together (cache rows); more wait in a queue."""
    max_len: int | None = None
    """Prompt + generated tokens per request; None: the model's max_position_embeddings."""
    max_step_tokens: int | None = None
    """Tokens fed to the model per step: every decoding request's 1 + speculative_tokens, the rest goes to prompt
    chunks (chunked prefill, so a long prompt never stalls running decodes). None: 512 more than the decodes need."""
    speculative_tokens: int = 0
    """MTP self-speculation: draft this many tokens per step with the model's MTP head (0: off)."""
    ssm_dtype: str = "fp32"
    """Mamba SSM state cache dtype: fp32 | bf16 | fp16."""
    stochastic_rounding: bool = True
    """Round the bf16 / fp16 SSM state stochastically (unbiased) rather than to nearest."""
    seed: int = 0
    """Seeds requests without their own seed, and stochastic rounding."""
    compile: bool = False
    """Compile the decode step (and a single row's short prompt chunks) with torch.compile: fused kernels instead of
    hundreds of small ops per token, worth several times the decode speed of small models on CPU. The first steps
    wait for the compiler (tens of seconds); attention then spans the whole cache row (masked) so that shapes stay
    static."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.speculative_tokens < 0:
            raise ValueError("speculative_tokens must be >= 0")
        if self.ssm_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"ssm_dtype must be fp32, bf16 or fp16, got {self.ssm_dtype!r}")
        if self.max_step_tokens is None:
            self.max_step_tokens = self.max_batch * (1 + self.speculative_tokens) + 512
        if self.max_step_tokens <= self.max_batch * (1 + self.speculative_tokens):
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must exceed max_batch x (1 + speculative_tokens) "
                f"({self.max_batch * (1 + self.speculative_tokens)}) so prompts always make progress"
            )
