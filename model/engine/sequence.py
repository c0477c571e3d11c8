"""One request inside the engine (Sequence), and what it hands out: Delta per step, Completion at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.engine.params import SamplingParams
from model.engine.reasoning import Thinking
from model.engine.sampling import StepLogprobs, TokenLogprob
from model.engine.text import IncrementalText, find_stop
from model.tokenizer import Tokenizer


@dataclass
class Delta:
    """What one engine step added to a request. Concatenating a request's deltas gives its Completion."""

    request_id: str
    token_ids: list[int]
    text: str
    """New answer text."""
    reasoning: str
    """New reasoning text (chat requests that think; empty otherwise)."""
    logprobs: list[TokenLogprob] | None
    """Of token_ids, when the request asked for logprobs."""
    finish_reason: str | None
    """On the last delta: "stop" (stop token or string), "length" (max_tokens) or "abort"."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """On the first delta, when asked: one entry per prompt token, None for the first."""
    forced: list[bool] = field(default_factory=list)
    """Per token of token_ids: the engine chose it (a `</think>` at the thinking budget) rather than the sampler."""
    weights_version: int | None = None
    """The version of the weights generating the request (Engine.weights_version when it started; a reload waits
    for running requests)."""


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens, a stop token included."""
    text: str
    """The answer: the generated text after the reasoning, stop strings cut off, special tokens skipped."""
    reasoning: str | None
    """The reasoning, for chat requests with thinking on; None otherwise."""
    finish_reason: str
    stop_reason: int | str | None
    """The stop token id or stop string that ended the request, if one did."""
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    forced: list[bool]
    """Per generated token: forced by the engine (a `</think>` at the thinking budget), not sampled; a trainer
    leaves these out of the policy loss."""
    weights_version: int | None
    """The weights version the tokens were generated with (None only for a request aborted before it started)."""

    @classmethod
    def from_deltas(cls, prompt: list[int], deltas: list[Delta], reasoning: bool) -> Completion:
        """The Completion a request's Deltas add up to (for callers that streamed them); stop_reason is not in
        Deltas and comes back None."""
        logprobs = None if deltas[0].logprobs is None else [lp for d in deltas for lp in d.logprobs or []]
        return cls(
            request_id=deltas[0].request_id,
            prompt_token_ids=prompt,
            token_ids=[t for d in deltas for t in d.token_ids],
            text="".join(d.text for d in deltas),
            reasoning="".join(d.reasoning for d in deltas) if reasoning else None,
            finish_reason=deltas[-1].finish_reason,
            stop_reason=None,
            logprobs=logprobs,
            prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
            forced=[f for d in deltas for f in d.forced],
            weights_version=deltas[-1].weights_version,
        )


class Sequence:
    """A request's prompt, its progress through prefill and decode, and its outputs so far."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop_ids: set[int],
        tokenizer: Tokenizer | None,
        generator: torch.Generator,
        thinking: Thinking | None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_key = tuple(prompt)
        """The prompt as a dict key: the engine feeds the prompt chunks of rows with equal keys once."""
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.generator = generator
        self.thinking = thinking
        self.slot: int | None = None
        self.prefilled = 0
        self.tokens: list[int] = []
        self.forced: list[bool] = []
        self.weights_version: int | None = None
        """Set when the engine admits the request."""
        self.drafts: list[int] = []
        self.draft_probs: torch.Tensor | None = None  # (k, V) for sampled requests
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.texts = {
            channel: IncrementalText(tokenizer, params.skip_special_tokens) for channel in ("text", "reasoning")
        } if tokenizer is not None else None
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars that may start a stop string
        self.shown = {"text": 0, "reasoning": 0}
        self.shown_tokens = 0
        self.shown_logprobs = 0
        self.shown_prompt_logprobs = False

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt) and self.finish_reason is None

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.prefilled

    def append(self, tokens: list[int], logprobs: StepLogprobs | None) -> int:
        """Add generated tokens in order, logprobs being those of the positions that produced them (when the request
        reports them). Stops early when a token ends the request or a forced `</think>` replaces a token (what
        follows was predicted from the replaced one). Returns how many tokens were kept."""
        kept = 0
        for position, token in enumerate(tokens):
            # Forced whatever the sampler drew, even the same token: the budget, not the draw, decided it.
            force = self.thinking is not None and self.thinking.force_end
            replaced = force and token != self.thinking.end_id
            self.forced.append(force)
            token = self.thinking.end_id if force else token
            if self.logprobs is not None:
                self.logprobs.append(self._reported(logprobs, position, token, force))
            self._add(token)
            kept += 1
            if self.finish_reason is not None or replaced:
                break
        return kept

    def _reported(self, logprobs: StepLogprobs, position: int, token: int, forced: bool) -> TokenLogprob:
        """The entry logprobs report for token; a forced token is certain under the processed distribution (the
        engine, not the sampler, chose it)."""
        if forced and self.params.logprobs_mode == "processed":
            return TokenLogprob(token, 0.0, [(token, 0.0)] if self.params.logprobs else [])
        return logprobs.of(position, token)

    def _add(self, token: int) -> None:
        self.tokens.append(token)
        channel = "text"
        if self.thinking is not None:
            channel = "reasoning" if self.thinking.active else "text"
            ends_thought = self.thinking.active and token == self.thinking.end_id
            self.thinking.observe(token)
            if ends_thought:
                channel = None
        if token in self.stop_ids:
            self.finish("stop", token)
            return
        if channel is not None and self.texts is not None:
            self._add_text(channel, token)
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self.finish("length")

    def _add_text(self, channel: str, token: int) -> None:
        stream = self.texts[channel]
        start = len(stream.text)
        if stream.push(token) and self.params.stop:
            hit = find_stop(stream.text, self.params.stop, max(0, start - self.hold))
            if hit is not None:
                stream.text = stream.text[: hit[0]]
                self.finish("stop", hit[1])

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason, self.stop_reason = reason, stop_reason
        if self.texts is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            for stream in self.texts.values():
                stream.flush()

    def delta(self) -> Delta | None:
        """What was added since the last delta; None when nothing was. Text that could still turn out to begin a
        stop string is held back until it cannot."""
        texts = {}
        for channel in ("text", "reasoning"):
            full = self.texts[channel].text if self.texts is not None else ""
            visible = len(full) if self.finish_reason is not None else max(len(full) - self.hold, self.shown[channel])
            texts[channel] = full[self.shown[channel] : visible]
            self.shown[channel] = visible
        tokens, forced = self.tokens[self.shown_tokens :], self.forced[self.shown_tokens :]
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.shown_prompt_logprobs and self.decoding_or_done:
            prompt_logprobs, self.shown_prompt_logprobs = self.prompt_logprobs, True
        if not tokens and not any(texts.values()) and self.finish_reason is None and prompt_logprobs is None:
            return None
        self.shown_tokens = len(self.tokens)
        logprobs = None
        if self.logprobs is not None:
            logprobs, self.shown_logprobs = self.logprobs[self.shown_logprobs :], len(self.logprobs)
        return Delta(
            self.request_id, tokens, texts["text"], texts["reasoning"], logprobs, self.finish_reason, prompt_logprobs,
            forced, self.weights_version,
        )

    @property
    def decoding_or_done(self) -> bool:
        return self.prefilled == len(self.prompt) or self.finish_reason is not None

    def completion(self) -> Completion:
        texts = self.texts or {}
        return Completion(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            token_ids=list(self.tokens),
            text=texts["text"].text if texts else "",
            reasoning=(texts["reasoning"].text if texts else "") if self.thinking is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            forced=list(self.forced),
            weights_version=self.weights_version,
        )
