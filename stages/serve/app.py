"""The HTTP application: OpenAI-compatible routes over a BackgroundEngine, plus /health, /metrics and SGLang's weight
reload routes (/update_weights_from_disk, /get_model_info; see stages.serve.protocol).

The model loads on a thread after the server starts, so /health answers 503 until it is ready. Handlers bridge the
engine thread to asyncio: each request's Deltas arrive on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from model.engine import Completion, Delta, Engine, PromptTooLong
from model.engine.background import BackgroundEngine
from model.errors import UserError
from stages.serve import protocol
from stages.serve.metrics import render_metrics
from stages.serve.protocol import APIError


class Server:
    """What the handlers share: the engine once loaded, the tokenizer, request counters."""

    def __init__(self, model_name: str, load: Callable[[], Engine], model_path: Path | None = None):
        self.model_name = model_name
        self._load = load
        self.model_path = model_path
        """The checkpoint whose weights serve: the one loaded at start, then the last one reloaded."""
        self.engine: BackgroundEngine | None = None
        self.token_text: protocol.TokenText | None = None
        self.status = "loading"
        """loading | ready | failed | stopping"""
        self.error: str | None = None
        self.on_failure: Callable[[], None] = lambda: None
        """Called (from the loading thread) when loading fails, e.g. to stop the HTTP server."""
        self.created = int(time.time())
        self.responses: Counter[tuple[str, int]] = Counter()

    def load(self) -> None:
        try:
            engine = self._load()
        except Exception as err:  # reported by `n3 serve` as its error, after the HTTP server stops
            self.status, self.error = "failed", str(err)
            self.on_failure()
            return
        self.token_text = protocol.TokenText(engine.tokenizer)
        self.engine = BackgroundEngine(engine).start()
        self.status = "ready"

    def ready(self) -> BackgroundEngine:
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           kind="service_unavailable")
        if self.status != "ready" or self.engine.error is not None:
            raise APIError(503, "the engine is not serving (shutting down or failed)", kind="service_unavailable")
        return self.engine

    def submit(self, queue: asyncio.Queue, index: int, **request):
        """Queue one engine request whose Deltas land on `queue` as (index, delta). Returns the engine's request."""
        loop = asyncio.get_running_loop()
        try:
            return self.ready().submit(lambda d: loop.call_soon_threadsafe(queue.put_nowait, (index, d)), **request)
        except PromptTooLong as err:
            raise APIError(400, str(err), param="messages" if "messages" in request else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        except RuntimeError as err:
            raise APIError(503, str(err), kind="service_unavailable") from None


async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None


async def _collect(queue: asyncio.Queue, requests: list) -> list[Completion]:
    """Wait for every request to finish; their Completions in order (an engine failure is a 500)."""
    deltas: list[list[Delta]] = [[] for _ in requests]
    finished = 0
    while finished < len(requests):
        index, delta = await queue.get()
        deltas[index].append(delta)
        finished += delta.finish_reason is not None
    if any(d[-1].finish_reason == "abort" for d in deltas):
        raise APIError(500, "the engine stopped before the request finished", kind="server_error")
    return [Completion.from_deltas(r.prompt, d, r.thinking is not None) for r, d in zip(requests, deltas)]


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def build_app(server: Server) -> Starlette:
    async def health(_: Request) -> Response:
        ok = server.status == "ready" and server.engine.error is None
        return JSONResponse({"status": server.status if ok or server.status != "ready" else "failed"},
                            status_code=200 if ok else 503)

    async def models(_: Request) -> Response:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "n3"}
        if server.engine is not None:  # the context length, as vLLM reports it (clients size prompts by it)
            card["max_model_len"] = server.engine.engine.max_len
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(_: Request) -> Response:
        text = render_metrics(server.responses, server.engine.engine if server.engine else None, server.status)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(request: Request) -> Response:
        req = protocol.parse_chat(await _json(request), server.model_name)
        queue: asyncio.Queue = asyncio.Queue()
        chat = dict(messages=req.messages, tools=req.tools, template_kwargs=req.template_kwargs)
        submitted = _submit_all(server, queue, [chat] * req.n, req)
        response_id = protocol.new_id("chatcmpl")
        if req.stream:
            return _stream(_chat_chunks(server, req, queue, submitted, response_id), server, submitted)
        completions = await _collect(queue, submitted)
        return JSONResponse(protocol.chat_response(response_id, server.model_name, completions, req,
                                                   server.token_text))

    async def completions(request: Request) -> Response:
        req = protocol.parse_completion(await _json(request), server.model_name)
        queue: asyncio.Queue = asyncio.Queue()
        requests = [dict(prompt=p) for p in req.prompts for _ in range(req.n)]
        submitted = _submit_all(server, queue, requests, req)
        response_id = protocol.new_id("cmpl")
        if req.stream:
            return _stream(_completion_chunks(server, req, queue, submitted, response_id), server, submitted)
        done = await _collect(queue, submitted)
        tokenizer = server.engine.engine.tokenizer
        echoed = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts]  # as given, for echo
        choices = [protocol.completion_choice(i, c, req, echoed[i // req.n], server.token_text)
                   for i, c in enumerate(done)]
        prompt_tokens = sum(len(c.prompt_token_ids) for c in done[:: req.n])
        return JSONResponse({
            "id": response_id, "object": "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": choices,
            "usage": protocol.usage(prompt_tokens, sum(len(c.token_ids) for c in done)),
        })

    async def update_weights(request: Request) -> Response:
        """SGLang's contract: HTTP 400 with {"success": false, "message"} for anything that does not load."""
        try:
            req = protocol.parse_update_weights(await _json(request))
            engine = server.ready()
            loading = await asyncio.to_thread(engine.update_weights, Path(req.model_path), req.weight_version,
                                              req.abort_all_requests)  # reads and checks the checkpoint
            version = await asyncio.wrap_future(loading)  # once the requests in flight are done and it is copied
        except APIError as err:
            return JSONResponse({"success": False, "message": err.message}, status_code=err.status)
        except (UserError, RuntimeError) as err:
            return JSONResponse({"success": False, "message": str(err)}, status_code=400)
        server.model_path = Path(req.model_path)
        return JSONResponse({"success": True, "message": f"Succeeded to update model weights (version {version}).",
                             "num_paused_requests": 0, "weights_version": version})

    async def model_info(_: Request) -> Response:
        engine = server.ready().engine
        return JSONResponse({"model_path": str(server.model_path) if server.model_path else server.model_name,
                             "is_generation": True, "weights_version": engine.weights_version})

    async def api_error(request: Request, err: APIError) -> Response:
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, err: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        error = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code)
        return JSONResponse(error.body(), status_code=err.status_code)

    @asynccontextmanager
    async def lifespan(_: Starlette):
        threading.Thread(target=server.load, name="n3-load", daemon=True).start()
        yield
        # Uvicorn has already let the requests in flight finish: the engine only needs to stop.
        server.status = "stopping" if server.status == "ready" else server.status
        if server.engine is not None:
            await asyncio.to_thread(server.engine.stop, True)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/update_weights_from_disk", update_weights, methods=["POST"]),
        Route("/get_model_info", model_info, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(CountResponses, counts=server.responses, paths={r.path for r in routes})],
        exception_handlers={APIError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )


class CountResponses:
    """ASGI middleware: count responses by route and status code (other paths count as "other")."""

    def __init__(self, app, counts: Counter, paths: set[str]):
        self.app, self.counts, self.paths = app, counts, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counts[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _submit_all(server: Server, queue: asyncio.Queue, requests: list[dict], req: protocol.Common) -> list:
    """Queue one engine request per choice; if one is refused, abort those already queued."""
    submitted = []
    try:
        for i, request in enumerate(requests):
            params = protocol.choice_params(req.params, i % req.n)
            submitted.append(server.submit(queue, i, params=params, **request))
    except APIError:
        for seq in submitted:
            server.engine.abort(seq.request_id)
        raise
    return submitted


def _stream(chunks: AsyncIterator[str], server: Server, submitted: list) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # the client went away (or the stream ended): nothing left to compute for it
            for seq in submitted:
                server.engine.abort(seq.request_id)

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chunks(server: Server, req: protocol.Common, response_id: str, kind: str) -> Callable[..., str]:
    """A writer of stream events: chunk(choices, usage=None); every chunk carries "usage" once it was asked for."""
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": response_id, "object": kind, "created": created, "model": server.model_name, "choices": choices}
        if req.include_usage:
            body["usage"] = usage
        return _sse(body)

    return chunk


async def _chat_chunks(server, req, queue, submitted, response_id) -> AsyncIterator[str]:
    chunk = _chunks(server, req, response_id, "chat.completion.chunk")
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    generated = finished = 0
    while finished < req.n:
        index, delta = await queue.get()
        generated += len(delta.token_ids)
        finished += delta.finish_reason is not None
        body = {}
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.text:
            body["content"] = delta.text
        logprobs = server.token_text.chat_logprobs(delta.logprobs) if req.logprobs and delta.logprobs else None
        if body or logprobs or delta.finish_reason:
            yield chunk([{"index": index, "delta": body, "logprobs": logprobs, "finish_reason": delta.finish_reason}])
    if req.include_usage:
        yield chunk([], protocol.usage(len(submitted[0].prompt), generated))
    yield _sse("[DONE]")


async def _completion_chunks(server, req, queue, submitted, response_id) -> AsyncIterator[str]:
    chunk = _chunks(server, req, response_id, "text_completion")
    generated = finished = 0
    while finished < len(submitted):
        index, delta = await queue.get()
        generated += len(delta.token_ids)
        finished += delta.finish_reason is not None
        logprobs = None
        if req.logprobs is not None and delta.logprobs:
            logprobs = server.token_text.completion_logprobs([(lp.token_id, lp) for lp in delta.logprobs])
        if delta.text or logprobs or delta.finish_reason:
            yield chunk([{"index": index, "text": delta.text, "logprobs": logprobs,
                          "finish_reason": delta.finish_reason}])
    if req.include_usage:
        prompt_tokens = sum(len(seq.prompt) for seq in submitted[:: req.n])
        yield chunk([], protocol.usage(prompt_tokens, generated))
    yield _sse("[DONE]")
