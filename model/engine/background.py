"""BackgroundEngine: an Engine driven by its own thread, for servers and other concurrent callers.

Callers on any thread `submit` a request with a callback that receives its Deltas (on the engine thread: hand them
on, do not block), and may `abort` it. The thread steps while there is work and sleeps on its inbox otherwise.
`stop(drain=True)` finishes the requests in flight before the thread ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from model.engine.engine import Engine
from model.engine.params import SamplingParams
from model.engine.sequence import Delta, Sequence


class BackgroundEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[str, Callable[[Delta], None]] = {}
        self._stopping = False
        self._drain = True
        self.error: BaseException | None = None
        """The exception that stopped the engine thread, if one did (in-flight requests then end with "abort")."""
        self._thread = threading.Thread(target=self._loop, name="n3-engine", daemon=True)

    def start(self) -> BackgroundEngine:
        self._thread.start()
        return self

    def submit(
        self,
        on_delta: Callable[[Delta], None],
        prompt: list[int] | str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        """Check and queue a request (ValueError, before anything is queued, when it is invalid); `on_delta` gets
        each of its Deltas, the last one with a finish_reason. Returns the request (read its request_id and prompt;
        it belongs to the engine thread from now on)."""
        if self._stopping or self.error is not None:
            raise RuntimeError("the engine is shutting down")
        seq = self.engine.make_request(prompt, params, messages=messages, tools=tools,
                                       template_kwargs=template_kwargs, request_id=request_id)
        self._inbox.put(("add", seq, on_delta))
        return seq

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """End the thread: after the requests in flight finish (drain) or aborting them."""
        self._stopping, self._drain = True, drain
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._callbacks)

    def _loop(self) -> None:
        try:
            while True:
                self._take_inbox(block=not self.engine.has_work and not self._stopping)
                if self._stopping and not self._drain:
                    for request_id in list(self._callbacks):
                        self.engine.abort(request_id)
                if self.engine.has_work:
                    self._deliver(self.engine.step())
                elif self._stopping:
                    return
        except BaseException as err:  # keep the server answering: every waiting caller gets an abort
            self.error = err
            for request_id, callback in list(self._callbacks.items()):
                callback(Delta(request_id, [], "", "", None, "abort"))
            self._callbacks.clear()
            raise

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item, callback = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                try:
                    self.engine.add(item)
                except ValueError:  # a request id already in flight
                    callback(Delta(item.request_id, [], "", "", None, "abort"))
                    continue
                self._callbacks[item.request_id] = callback
            elif kind == "abort":
                self.engine.abort(item)

    def _deliver(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            callback = self._callbacks.get(delta.request_id)
            if callback is None:
                continue
            if delta.finish_reason is not None:
                del self._callbacks[delta.request_id]
            callback(delta)
