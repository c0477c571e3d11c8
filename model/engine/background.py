"""BackgroundEngine: an Engine driven by its own thread, for servers and other concurrent callers.

Callers on any thread `submit` a request with a callback that receives its Deltas (on the engine thread: hand them
on, do not block), and may `abort` it. The thread steps while there is work and sleeps on its inbox otherwise.
`stop(drain=True)` finishes the requests in flight before the thread ends.

`update_weights` loads new weights as SGLang's update_weights_from_disk does: requests in flight finish with the old
weights (or are aborted, when asked), requests submitted meanwhile wait, the weights load between two steps, then
the waiting requests start with them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path

import torch

from model.engine.engine import Engine
from model.engine.params import SamplingParams
from model.engine.sequence import Delta, Sequence
from model.errors import UserError


class BackgroundEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[str, Callable[[Delta], None]] = {}
        self._loads: list[tuple[tuple, Future]] = []
        """Weight loads asked for, in order: ((state dict, version, abort), future of the new version)."""
        self._held: list[tuple[Sequence, Callable[[Delta], None]]] = []
        """Requests submitted while a load waits for the requests in flight."""
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
        self._check_open()
        seq = self.engine.make_request(prompt, params, messages=messages, tools=tools,
                                       template_kwargs=template_kwargs, request_id=request_id)
        self._inbox.put(("add", seq, on_delta))
        return seq

    def update_weights(
        self, source: str | Path | Mapping[str, torch.Tensor], version: int | None = None, abort: bool = False
    ) -> Future:
        """Engine.load_weights between steps, once the requests in flight have finished (aborted first, with abort);
        requests submitted from now on wait and start with the new weights. A checkpoint folder is read and checked
        here, on the calling thread, while the engine goes on (UserError before anything is queued). Returns a
        Future of the new weights version (its exception: a state dict that does not fit; the old weights stay)."""
        self._check_open()
        state = source if isinstance(source, Mapping) else self.engine.read_weights(source)
        future: Future = Future()
        self._inbox.put(("load", (state, version, abort), future))
        return future

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def _check_open(self) -> None:
        if self._stopping or self.error is not None:
            raise RuntimeError("the engine is shutting down")

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
                self._take_inbox(block=not self.engine.has_work and not self._stopping and not self._loads)
                if self._stopping and not self._drain:
                    self._abort_in_flight()
                if self._loads and not self.engine.has_work:
                    self._load()
                if self.engine.has_work:
                    self._deliver(self.engine.step())
                elif self._stopping:
                    return
        except BaseException as err:  # keep the server answering: every waiting caller gets an abort
            self.error = err
            held = [(seq.request_id, callback) for seq, callback in self._held]
            for request_id, callback in list(self._callbacks.items()) + held:
                callback(_aborted(request_id))
            for _, future in self._loads:
                if not future.done():
                    future.set_exception(RuntimeError(f"the engine stopped: {err}"))
            self._callbacks.clear()
            self._held.clear()
            self._loads.clear()
            raise

    def _load(self) -> None:
        """Run the loads asked for (the engine is idle), then start the requests they held."""
        while self._loads:
            (state, version, _), future = self._loads[0]
            if future.set_running_or_notify_cancel():  # a load its caller cancelled does not run
                try:
                    future.set_result(self.engine.load_weights(state, version))
                except UserError as err:  # a state dict that does not fit: nothing was copied, the old weights stay
                    future.set_exception(err)
            self._loads.pop(0)
        held, self._held = self._held, []
        for seq, callback in held:
            self._add(seq, callback)

    def _abort_in_flight(self) -> None:
        for request_id in list(self._callbacks):
            self.engine.abort(request_id)

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item, callback = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add" and self._loads:
                self._held.append((item, callback))
            elif kind == "add":
                self._add(item, callback)
            elif kind == "abort":
                self._abort(item)
            elif kind == "load":
                self._loads.append((item, callback))
                if item[2]:
                    self._abort_in_flight()

    def _add(self, seq: Sequence, callback: Callable[[Delta], None]) -> None:
        try:
            self.engine.add(seq)
        except ValueError:  # a request id already in flight
            callback(_aborted(seq.request_id))
            return
        self._callbacks[seq.request_id] = callback

    def _abort(self, request_id: str) -> None:
        for i, (seq, callback) in enumerate(self._held):
            if seq.request_id == request_id:
                del self._held[i]
                callback(_aborted(request_id))
                return
        self.engine.abort(request_id)

    def _deliver(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            callback = self._callbacks.get(delta.request_id)
            if callback is None:
                continue
            if delta.finish_reason is not None:
                del self._callbacks[delta.request_id]
            callback(delta)


def _aborted(request_id: str) -> Delta:
    """The last Delta of a request that ends without running (or whose engine stopped)."""
    return Delta(request_id, [], "", "", None, "abort")
