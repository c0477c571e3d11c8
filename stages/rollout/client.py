"""EndpointBackend: any OpenAI-compatible server (n3 serve, vLLM, SGLang) through /v1/completions, with prompts
sent as token ids, and /v1/chat/completions for conversations (with `chat_template_kwargs`, as vLLM takes them).
Rollouts need n3 serve's extensions (`logprobs_mode`, `return_token_ids` with forced and weights_version; see
stages.serve.protocol) and its SGLang-style POST /update_weights_from_disk.
Requests run on `concurrency` threads; errors the server answers become one-line UserErrors that quote it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.rollout.backend import Backend, Reply, Rollout, Timing, TokenScore, rollout_seed


class EndpointBackend(Backend):
    def __init__(self, url: str, tokenizer: Path | None, model: str | None = None, concurrency: int = 8,
                 timeout: float = 3600):
        if tokenizer is None:
            raise UserError("--endpoint needs --tokenizer: the served model's tokenizer.json or a folder holding one "
                            "(for an n3 server, its checkpoint), to measure lengths in the model's tokens")
        if concurrency < 1:
            raise UserError(f"--concurrency must be at least 1, got {concurrency}")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        self.concurrency = concurrency
        self.batch_size = 4 * concurrency
        self.tokenizer = Tokenizer.load(tokenizer)
        served = self._request("GET", "/v1/models").get("data") or []
        names = [m.get("id") for m in served]
        if model is not None and model not in names:
            raise UserError(f"{self.base} does not serve {model!r}; it serves {', '.join(map(str, names)) or 'nothing'}")
        if not names:
            raise UserError(f"{self.base}/v1/models lists no model")
        self.model = model or names[0]
        card = served[names.index(self.model)]
        self.context = card.get("max_model_len")  # vLLM says; others do not
        self.description = f"{self.base} (model {self.model}, tokenizer {tokenizer}, {concurrency} concurrent requests)"

    # --- HTTP -------------------------------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise UserError(f"{self.base}{path}: HTTP {err.code}: {_error_message(err)}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"cannot reach {self.base} ({reason}); is the server running?") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as response:
            try:
                return json.loads(response.read())
            except json.JSONDecodeError:
                raise UserError(f"{self.base}{path} did not answer JSON; is it an OpenAI-compatible server?") from None

    def _complete(self, body: dict) -> dict:
        answer = self._request("POST", "/v1/completions", {"model": self.model} | body)
        if not answer.get("choices"):
            raise UserError(f"{self.base}/v1/completions answered without choices")
        return answer["choices"][0]

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    # --- Backend ----------------------------------------------------------------------------------------------------
    def generate(self, prompts, max_tokens, stop=None, temperature=0.0):
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        extra = {"stop": list(stop)} if stop else {}

        def one(item):
            prompt, limit = item
            return self._complete({"prompt": prompt, "max_tokens": limit, "temperature": temperature} | extra)["text"]

        return self._map(one, list(zip(prompts, limits)))

    def _chat(self, messages: list[dict], max_tokens: int, temperature: float, template_kwargs: dict,
              extra: dict | None = None) -> dict:
        """The answer of /v1/chat/completions to one conversation, with `extra` request fields."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        answer = self._request("POST", "/v1/chat/completions",
                               body | ({"chat_template_kwargs": template_kwargs} if template_kwargs else {})
                               | (extra or {}))
        if not answer.get("choices"):
            raise UserError(f"{self.base}/v1/chat/completions answered without choices")
        return answer

    def chat(self, conversations, max_tokens, temperature=0.0, **template_kwargs):
        def one(messages: list[dict]) -> Reply:
            answer = self._chat(messages, max_tokens, temperature, template_kwargs)
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            content, reasoning = _message_text(choice)
            return Reply(content, reasoning, usage.get("completion_tokens", 0), choice.get("finish_reason") or "stop")

        return self._map(one, conversations)

    def rollout(self, conversations, max_tokens, n=1, temperature=1.0, top_p=1.0, top_k=0, max_thinking_tokens=None,
                seed=None, **template_kwargs):
        extra = {"n": n, "top_p": top_p, "top_k": top_k, "max_thinking_tokens": max_thinking_tokens,
                 "logprobs": True, "logprobs_mode": "processed", "return_token_ids": True}

        def one(item: tuple[int, list[dict]]) -> list[Rollout]:
            i, messages = item
            answer = self._chat(messages, max_tokens, temperature, template_kwargs,
                                extra | {"seed": None if seed is None else rollout_seed(seed, i)})
            return [self._rollout(answer, choice) for choice in sorted(answer["choices"], key=lambda c: c["index"])]

        return self._map(one, list(enumerate(conversations)))

    def _rollout(self, answer: dict, choice: dict) -> Rollout:
        fields = [answer.get("prompt_token_ids"), *(choice.get(k) for k in ("token_ids", "forced", "weights_version")),
                  (choice.get("logprobs") or {}).get("content")]
        if any(f is None for f in fields):
            raise UserError(f"{self.base} did not return token ids, forced tokens, weights version and log-probabilities "
                            "(return_token_ids, logprobs): rollouts need n3 serve")
        prompt_ids, token_ids, forced, version, logprobs = fields
        content, reasoning = _message_text(choice)
        return Rollout(prompt_ids, token_ids, [e["logprob"] for e in logprobs], forced, content, reasoning,
                       choice.get("finish_reason") or "stop", version)

    def update_weights(self, path):
        # The server reads the path: absolute, so that one on this machine names the same folder there.
        answer = self._request("POST", "/update_weights_from_disk", {"model_path": str(Path(path).absolute())})
        if "weights_version" not in answer:
            raise UserError(f"{self.base} reloaded {path} without saying its weights version (n3 serve does)")
        return answer["weights_version"]

    def score(self, sequences):
        def one(ids: list[int]) -> list[TokenScore]:
            # echo + logprobs scores the prompt; servers want max_tokens >= 1 (vLLM does), so one token is generated
            # and dropped.
            choice = self._complete({"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
            logprobs = choice.get("logprobs") or {}
            values, tops = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
            if values is None or tops is None or len(values) < len(ids):
                raise UserError(f"{self.base} did not return prompt log-probabilities (echo + logprobs)")
            return [TokenScore(v, max(top.values()) <= v + 1e-6) for v, top in zip(values[1 : len(ids)],
                                                                                tops[1 : len(ids)])]

        return self._map(one, sequences)

    def spell(self, ids: list[int]) -> list[str]:
        """How the server writes each of these token ids (its echo of them as a prompt): a check that it shares a
        tokenizer."""
        choice = self._complete({"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0})
        return ((choice.get("logprobs") or {}).get("tokens") or [])[: len(ids)]

    def timed(self, prompts, max_tokens, concurrency):
        def one(ids: list[int]) -> Timing:
            body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            timing = Timing(time.perf_counter(), prompt_tokens=len(ids))
            with self._open("POST", "/v1/completions", body) as response:
                for line in response:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        timing.arrivals.append(time.perf_counter())
                    if chunk.get("usage"):
                        timing.output_tokens = chunk["usage"]["completion_tokens"]
            if not timing.output_tokens:
                raise UserError(f"{self.base} streamed no usage; it must support stream_options.include_usage")
            return timing

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, prompts))


def _message_text(choice: dict) -> tuple[str, str | None]:
    """A chat choice's answer and reasoning (vLLM and n3 serve say reasoning_content, newer servers reasoning)."""
    message = choice.get("message") or {}
    return message.get("content") or "", message.get("reasoning_content", message.get("reasoning"))


def _error_message(err: urllib.error.HTTPError) -> str:
    raw = err.read()
    try:
        body = json.loads(raw)
        return body["error"]["message"] if "error" in body else body["message"]  # OpenAI's form, or SGLang's
    except (json.JSONDecodeError, KeyError, TypeError):
        return raw.decode(errors="replace").strip()[:200] or err.reason
