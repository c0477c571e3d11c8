"""Where a model runs for the stages that sample from it: one small interface, two implementations.

- EngineBackend: a checkpoint loaded in this process, driven through model.engine's public API.
- EndpointBackend (stages.rollout.client): any OpenAI-compatible server (n3 serve, vLLM) through /v1/completions
  and /v1/chat/completions.

Prompts cross the interface as token ids, encoded here with the model's tokenizer: lengths are exact, and both
backends see the same input. `encode` prepends the tokenizer's bos token when it has one, as n3 stores documents.
Conversations (`chat`, `rollout`) go through the model's own chat template: the engine's tokenizer in-process, the
server's.

For RL: `rollout` samples n replies per conversation with what a policy-gradient trainer needs (token ids, their
log-probabilities under the sampling distribution, which tokens the engine forced, the weights version), and
`update_weights` loads the trainer's newest checkpoint into the model that generates. With a seed, both backends draw
the same samples (rollout_seed).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import UserError
from model.tokenizer import Tokenizer
from presets.schema import RunConfig
from stages.runtime.settings import engine_config, load_engine, open_checkpoint


@dataclass
class TokenScore:
    logprob: float
    """log P(token | the tokens before it)."""
    greedy: bool
    """The token is the model's most likely one at its position."""


@dataclass
class Reply:
    """An assistant reply to a conversation."""

    content: str
    reasoning: str | None
    """The reasoning, apart, when the reply opened with a thought; None otherwise."""
    tokens: int
    """Tokens generated, reasoning included."""
    finish_reason: str


@dataclass
class Rollout:
    """One sampled reply to a conversation, with what a policy-gradient trainer needs."""

    prompt_ids: list[int]
    """The rendered conversation (chat template, with the generation prompt)."""
    token_ids: list[int]
    """Generated tokens, the stop/end token included."""
    logprobs: list[float]
    """Per generated token, under the sampling distribution (logprobs_mode="processed")."""
    forced: list[bool]
    """Per generated token: forced by the engine (a </think> at the thinking budget), not sampled."""
    content: str
    """The answer text after the reasoning."""
    reasoning: str | None
    finish_reason: str
    """"stop" | "length"."""
    weights_version: int


def rollout_seed(seed: int, conversation: int) -> int:
    """The seed of sample 0 of a conversation in a seeded rollout call; sample j takes this + j, as n3 serve seeds
    the n choices of one request, so that both backends draw the same samples whatever the batch. A hash (of the
    string, stable across processes) keeps the conversations' seed ranges apart."""
    return random.Random(f"{seed}/{conversation}").getrandbits(62)


def rollout_context(conversations: list[list[dict]], tokenizer: Tokenizer, max_tokens: int, limit: int,
                    **template_kwargs) -> int:
    """The context an in-process rollout engine needs: the longest rendered conversation plus max_tokens (and the
    thinking budget's forced token), rounded up to 64, at most `limit` (the rows replies are packed into). A compiled
    decode step attends over the engine's whole context, so one no longer than the rollouts need decodes faster."""
    longest = max((len(tokenizer.encode_chat(c, **template_kwargs)) for c in conversations), default=0)
    return min(limit, -(-(longest + max_tokens + 2) // 64) * 64)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of a training step's rollouts on a rank: the same on resume."""
    return (seed * 1_000_003 + step) * 1024 + rank


@dataclass
class Timing:
    """One request of a throughput run, in time.perf_counter() seconds."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    """When each piece of output arrived (an engine step's tokens, or a stream chunk)."""
    output_tokens: int = 0
    prompt_tokens: int = 0


class Backend(ABC):
    tokenizer: Tokenizer
    description: str
    """What runs the model, for reports."""
    context: int | None
    """The most tokens a request may hold (prompt + output), when known."""
    batch_size: int
    """Requests worth sending at once (enough to keep the model's batch full)."""

    def encode(self, text: str) -> list[int]:
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        return bos + self.tokenizer.encode(text)

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], max_tokens: int | list[int], stop: list[str] | None = None,
        temperature: float = 0.0,
    ) -> list[str]:
        """The completion text of each prompt (greedy at temperature 0), cut before any stop string."""

    @abstractmethod
    def chat(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0,
             **template_kwargs) -> list[Reply]:
        """Each conversation's reply, rendered by the model's chat template with template_kwargs (enable_thinking...)."""

    @abstractmethod
    def score(self, sequences: list[list[int]]) -> list[list[TokenScore]]:
        """For each sequence, a TokenScore per token after the first."""

    @abstractmethod
    def timed(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Timing]:
        """Complete every prompt to exactly max_tokens (eos ignored), keeping `concurrency` requests in flight."""

    @abstractmethod
    def rollout(self, conversations: list[list[dict]], max_tokens: int, n: int = 1, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, max_thinking_tokens: int | None = None,
                seed: int | None = None, **template_kwargs) -> list[list[Rollout]]:
        """n samples of each conversation (outer list: conversations, inner: samples), all submitted at once so the
        engine batches them continuously."""

    @abstractmethod
    def update_weights(self, path: Path) -> int:
        """Load the checkpoint at `path` into the model that generates; returns the new weights version."""


class EngineBackend(Backend):
    def __init__(self, engine, description: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.description = description
        self.context = engine.max_len
        self.batch_size = 2 * engine.config.max_batch

    def _run(self, prompts: list[list[int]] | None, params: list, **chat) -> list:
        """Completions of token-id prompts, or with chat=dict(messages=[...], template_kwargs=...) of conversations."""
        from model.engine import PromptTooLong

        try:  # every request is checked before any is queued
            if prompts is None:
                requests = [self.engine.make_request(None, sp, messages=m, template_kwargs=chat["template_kwargs"])
                            for m, sp in zip(chat["messages"], params)]
            else:
                requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        except PromptTooLong as err:
            raise UserError(f"{err}; lower the evaluation's lengths or raise serve.max_len") from None
        return self.engine.run([self.engine.add(r) for r in requests])

    def generate(self, prompts, max_tokens, stop=None, temperature=0.0):
        from model.engine import SamplingParams

        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        params = [SamplingParams(max_tokens=m, temperature=temperature, stop=list(stop or [])) for m in limits]
        return [c.text for c in self._run(prompts, params)]

    def chat(self, conversations, max_tokens, temperature=0.0, **template_kwargs):
        from model.engine import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature)] * len(conversations)
        done = self._run(None, params, messages=conversations, template_kwargs=template_kwargs)
        return [Reply(c.text, c.reasoning, len(c.token_ids), c.finish_reason) for c in done]

    def score(self, sequences):
        from model.engine import SamplingParams

        params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        done = self._run(sequences, [params] * len(sequences))
        return [[TokenScore(lp.logprob, lp.top[0][0] == lp.token_id) for lp in c.prompt_logprobs[1:]] for c in done]

    def rollout(self, conversations, max_tokens, n=1, temperature=1.0, top_p=1.0, top_k=0, max_thinking_tokens=None,
                seed=None, **template_kwargs):
        from model.engine import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=None if seed is None else rollout_seed(seed, i) + j, logprobs=0,
                                 logprobs_mode="processed", max_thinking_tokens=max_thinking_tokens)
                  for i in range(len(conversations)) for j in range(n)]
        done = self._run(None, params, messages=[m for m in conversations for _ in range(n)],
                         template_kwargs=template_kwargs)
        rollouts = [Rollout(c.prompt_token_ids, c.token_ids, [lp.logprob for lp in c.logprobs], c.forced, c.text,
                            c.reasoning, c.finish_reason, c.weights_version) for c in done]
        return [rollouts[i : i + n] for i in range(0, len(rollouts), n)]

    def update_weights(self, path):
        return self.engine.load_weights(path)

    def timed(self, prompts, max_tokens, concurrency):
        from model.engine import SamplingParams

        engine = self.engine
        if concurrency > engine.config.max_batch:
            raise UserError(f"concurrency {concurrency} exceeds the engine's batch ({engine.config.max_batch})")
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        waiting = list(range(len(prompts)))
        timings: dict[int, Timing] = {}
        running: dict[str, int] = {}
        while waiting or running:
            while waiting and len(running) < concurrency:
                i = waiting.pop(0)
                timings[i] = Timing(time.perf_counter(), prompt_tokens=len(prompts[i]))
                running[engine.submit(prompts[i], params)] = i
            deltas = engine.step()
            now = time.perf_counter()
            for delta in deltas:
                i = running.get(delta.request_id)
                if i is None:
                    continue
                if delta.token_ids:
                    timings[i].arrivals.append(now)
                    timings[i].output_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    del running[delta.request_id]
        return [timings[i] for i in range(len(prompts))]


PREFILL_CHUNK = 4096
"""Prompt tokens per engine step when the preset does not say: evaluations are bound by throughput, not by the
latency of requests running beside a long prompt (what `n3 serve`'s smaller default protects)."""


def engine_backend(path: Path, cfg: RunConfig, warn: Callable[[str], None], max_len: int | None = None,
                   max_batch: int | None = None, speculative_tokens: int | None = None,
                   compile: bool | None = None) -> EngineBackend:
    """A checkpoint (or a run folder's newest) in an in-process engine sized as `n3 serve` would size it from the
    preset, with an evaluation's own context, batch, speculation or decode compilation where it sets them."""
    config = engine_config(cfg, max_len, max_batch, speculative_tokens, PREFILL_CHUNK, compile)
    checkpoint, _ = open_checkpoint(path, "n3 eval", config.speculative_tokens)
    engine = load_engine(checkpoint, cfg, config, warn)
    weights = str(engine.model.lm_head.weight.dtype).removeprefix("torch.")
    return EngineBackend(engine, f"{checkpoint} (in-process engine, {engine.device.type}, {weights})")
