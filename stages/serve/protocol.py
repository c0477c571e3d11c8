"""The OpenAI wire format: request bodies checked and turned into engine requests, engine results turned into
response bodies and stream chunks, and errors as `{"error": {"message", "type", "param", "code"}}`.

Fields beyond OpenAI's, as vLLM accepts them: top_k, stop_token_ids, ignore_eos, skip_special_tokens, and
max_thinking_tokens / thinking_grace (reasoning budget). Unknown fields are ignored, as OpenAI does.

What RL rollouts need (chat and completions, not with stream):
- `logprobs_mode`: "raw" (default: the model's log-softmax) or "processed" (the distribution each token was sampled
  from, after temperature, top-k and top-p; what vLLM's server-wide --logprobs-mode processed_logprobs gives). A
  filtered-out alternative's -inf is written -9999.0, as vLLM writes it.
- `return_token_ids` (vLLM's): the prompt's token ids (`prompt_token_ids`, on the chat response, on each completions
  choice) and each choice's generated `token_ids`; n3 adds per choice `forced` (per token: the engine forced it, a
  `</think>` at the thinking budget, rather than sampling it) and `weights_version` (the weights that generated it).
- `seed` with n > 1: choice i is seeded with seed + i.

Weight reloads (SGLang's contract): `POST /update_weights_from_disk` with {"model_path", "load_format": null | "auto"
| "safetensors", "abort_all_requests": false, "weight_version": null | int} answers {"success": true, "message",
"num_paused_requests": 0, "weights_version"} or, with HTTP 400, {"success": false, "message"} (the old weights still
serve). As in SGLang, requests in flight finish with the old weights first (abort_all_requests: they end with
"abort"), and requests arriving meanwhile wait for the new ones. `GET /get_model_info` answers {"model_path",
"is_generation": true, "weights_version"}; /metrics has n3_weights_version.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

from model.engine import Completion, SamplingParams, TokenLogprob
from model.tokenizer import Tokenizer
from stages.chat.rows import RowError, parse_messages

MAX_N = 128
MAX_TOP_LOGPROBS = 20
LOWEST_LOGPROB = -9999.0
"""What JSON gets for a log-probability of -inf (vLLM's value): JSON has no infinity."""
LOAD_FORMATS = (None, "auto", "safetensors")


class APIError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


# --- reading fields -------------------------------------------------------------------------------------------------
def _field(body: dict, name: str, kinds: type | tuple[type, ...], default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is a required property", param=name, code="missing_required_parameter")
        return default
    value = body[name]
    # JSON has one number type: an integer-valued float is fine where a number is expected, bools are never numbers.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise invalid(name, f"'{name}' must be {_kind_names(kinds)}, got {value!r}")
    if float in (kinds if isinstance(kinds, tuple) else (kinds,)) and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        raise invalid(name, f"'{name}' must be {_kind_names(kinds)}, got {value!r}")
    return value


def _kind_names(kinds) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names[k] for k in kinds)


def _in_range(body: dict, name: str, value, low, high):
    if value is not None and not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", "'stop' must be a non-empty string or an array of non-empty strings")
    return stop


@dataclass
class Common:
    """What chat and completions requests share."""

    model: str
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    params: SamplingParams


def _common(body: dict, served: str, max_tokens_key: tuple[str, ...], default_max_tokens: int | None,
            min_max_tokens: int) -> Common:
    model = _field(body, "model", str, required=True)
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, float, 0.0) != 0:
            raise invalid(name, f"'{name}' is not supported by this server; leave it at 0")
    if _field(body, "logit_bias", dict):
        raise invalid("logit_bias", "'logit_bias' is not supported by this server")
    max_tokens = default_max_tokens
    for key in max_tokens_key:
        value = _field(body, key, int)
        if value is not None:
            max_tokens = _in_range(body, key, value, min_max_tokens, 1 << 40)
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict)
    if options is not None and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = bool((options or {}).get("include_usage", False))
    return_token_ids = _field(body, "return_token_ids", bool, False)
    if return_token_ids and stream:
        raise invalid("return_token_ids", "'return_token_ids' is not supported with 'stream'")
    n = _in_range(body, "n", _field(body, "n", int, 1), 1, MAX_N)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_in_range(body, "temperature", _field(body, "temperature", float, 1.0), 0.0, 2.0),
        top_p=_field(body, "top_p", float, 1.0),
        top_k=max(_field(body, "top_k", int, 0), 0),  # vLLM: -1 also means off
        seed=_field(body, "seed", int),
        stop=_stop_strings(body),
        stop_token_ids=_field(body, "stop_token_ids", list, []),
        ignore_eos=_field(body, "ignore_eos", bool, False),
        skip_special_tokens=_field(body, "skip_special_tokens", bool, True),
        max_thinking_tokens=_field(body, "max_thinking_tokens", int),
        thinking_grace=_field(body, "thinking_grace", int, SamplingParams.thinking_grace),
        logprobs_mode=_field(body, "logprobs_mode", str, SamplingParams.logprobs_mode),
    )
    if not 0 < params.top_p <= 1:
        raise invalid("top_p", f"'top_p' must be in (0, 1], got {params.top_p}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in params.stop_token_ids):
        raise invalid("stop_token_ids", "'stop_token_ids' must be an array of integers")
    return Common(model, n, stream, include_usage, return_token_ids, params)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n: with a seed, seed + i, so the n choices differ yet the response is reproducible."""
    if params.seed is None:
        return params
    return SamplingParams(**{**vars(params), "seed": params.seed + index})


# --- chat ----------------------------------------------------------------------------------------------------------

@dataclass
class ChatRequest(Common):
    messages: list[dict]
    logprobs: bool
    tools: list[dict] | None
    """Function definitions the chat template lists for the model (the model's calls come back in its text)."""
    template_kwargs: dict
    """`chat_template_kwargs`, as vLLM takes them: the template's switches, e.g. {"enable_thinking": false}."""


def parse_chat(body: dict, served: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    common = _common(body, served, ("max_tokens", "max_completion_tokens"), None, 1)
    raw = _field(body, "messages", list, required=True)
    try:
        messages = parse_messages(raw)
    except RowError as err:
        raise invalid(err.where, f"'{err.where}' {str(err).removeprefix(err.where + ': ')}") from None
    tools = _field(body, "tools", list)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise invalid("tools", "'tools' must be an array of objects")
    template_kwargs = _field(body, "chat_template_kwargs", dict, {})
    response_format = _field(body, "response_format", dict)
    if response_format and response_format.get("type", "text") != "text":
        raise invalid("response_format", "only response_format {'type': 'text'} is supported")
    logprobs = _field(body, "logprobs", bool, False)
    top = _in_range(body, "top_logprobs", _field(body, "top_logprobs", int), 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if logprobs:
        common.params.logprobs = top or 0
    return ChatRequest(**vars(common), messages=messages, logprobs=logprobs, tools=tools,
                       template_kwargs=template_kwargs)


# --- completions ----------------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest(Common):
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None


def parse_completion(body: dict, served: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    common = _common(body, served, ("max_tokens",), 16, 0)
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif prompt and all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                        for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt", "'prompt' must be a string, an array of strings, an array of token ids, "
                                "or an array of arrays of token ids (none empty)")
    if _field(body, "suffix", str):
        raise invalid("suffix", "'suffix' is not supported by this server")
    if _field(body, "best_of", int, common.n) != common.n:
        raise invalid("best_of", "'best_of' other than n is not supported by this server")
    echo = _field(body, "echo", bool, False)
    logprobs = _in_range(body, "logprobs", _field(body, "logprobs", int), 0, MAX_TOP_LOGPROBS)
    if echo and common.stream:
        raise invalid("echo", "'echo' is not supported with 'stream'")
    if common.params.max_tokens == 0 and not echo:
        raise invalid("max_tokens", "'max_tokens' may be 0 only with 'echo' (to score a prompt)")
    common.params.logprobs = logprobs
    if echo and logprobs is not None:
        common.params.prompt_logprobs = logprobs
    return CompletionRequest(**vars(common), prompts=prompts, echo=echo, logprobs=logprobs)


# --- weight reloads -------------------------------------------------------------------------------------------------
@dataclass
class UpdateWeightsRequest:
    """POST /update_weights_from_disk, as SGLang takes it (weight_version an integer here)."""

    model_path: str
    abort_all_requests: bool
    """Abort the requests in flight rather than let them finish with the old weights."""
    weight_version: int | None
    """The version the new weights are known by; None: the current one + 1."""


def parse_update_weights(body: dict) -> UpdateWeightsRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    path = _field(body, "model_path", str, required=True)
    load_format = _field(body, "load_format", str)
    if load_format not in LOAD_FORMATS:
        raise invalid("load_format", f"'load_format' {load_format!r}: this server loads safetensors checkpoints "
                                     "(leave it null, 'auto' or 'safetensors')")
    return UpdateWeightsRequest(path, _field(body, "abort_all_requests", bool, False),
                                _field(body, "weight_version", int))


# --- responses ------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token ids to the strings logprobs report: each token decoded alone, special tokens included."""

    def __init__(self, tokenizer: Tokenizer):
        self.text = lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict:
        """`choices[].logprobs` of a chat completion: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def entry(token: int, logprob: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}
        return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs]}

    def completion_logprobs(self, entries: list[tuple[int, TokenLogprob | None]], start: int = 0) -> dict:
        """`choices[].logprobs` of a text completion, from (token id, logprob) pairs: parallel arrays, with None for
        a token that has no log-probability (an echoed prompt's first). text_offset counts characters from start."""
        tokens, values, tops, offsets = [], [], [], []
        offset = start
        for token, lp in entries:
            text = self.text(token)
            tokens.append(text)
            values.append(None if lp is None else _finite(lp.logprob))
            tops.append(None if lp is None else {self.text(t): _finite(v) for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def token_fields(completion: Completion) -> dict:
    """What `return_token_ids` adds to a choice: token_ids (vLLM's), forced and weights_version (n3's)."""
    return {"token_ids": completion.token_ids, "forced": completion.forced,
            "weights_version": completion.weights_version}


def chat_response(request_id: str, model: str, completions: list[Completion], request: ChatRequest,
                  text: TokenText) -> dict:
    choices = []
    for i, c in enumerate(completions):
        message = {"role": "assistant", "content": c.text}
        if c.reasoning is not None:
            message["reasoning_content"] = c.reasoning
        choices.append({
            "index": i,
            "message": message,
            "logprobs": text.chat_logprobs(c.logprobs) if request.logprobs else None,
            "finish_reason": c.finish_reason,
        } | (token_fields(c) if request.return_token_ids else {}))
    prompt_tokens = len(completions[0].prompt_token_ids)
    response = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in completions))}
    if request.return_token_ids:  # one prompt for every choice: on the response, as vLLM puts it
        response["prompt_token_ids"] = completions[0].prompt_token_ids
    return response


def completion_choice(index: int, completion: Completion, request: CompletionRequest, prompt_text: str,
                      text: TokenText) -> dict:
    body = prompt_text + completion.text if request.echo else completion.text
    logprobs = None
    if request.logprobs is not None:
        entries = [(lp.token_id, lp) for lp in completion.logprobs]
        if request.echo:
            entries = list(zip(completion.prompt_token_ids, completion.prompt_logprobs)) + entries
        logprobs = text.completion_logprobs(entries)
    choice = {"index": index, "text": body, "logprobs": logprobs, "finish_reason": completion.finish_reason}
    if request.return_token_ids:
        choice |= {"prompt_token_ids": completion.prompt_token_ids} | token_fields(completion)
    return choice
