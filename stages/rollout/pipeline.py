"""Rollout batches through three stages, generation, scoring and learning, either one after another or concurrently
with bounded staleness (AReaL's asynchronous RL, REFERENCE.md section 4).

    for record in run_pipeline(range(start, steps), generate, score, learn, max_staleness=2):
        log.write(record)

- generate(step) -> (version, generated): batch `step`'s rollouts, and the policy version that sampled them;
- score(step, generated) -> scored: what the learner needs besides (teachers' log-probs, rewards);
- learn(step, version, scored) -> record: one update, after which the policy is version step + 1 (the learner
  publishes its weights for the generator itself, through a Mailbox).

Batch k may start generating only once the learner has made version k - max_staleness, so no batch is trained more
than max_staleness versions after the policy that sampled it (learn checks it). With max_staleness 0 each batch is
sampled by the weights of the update before it: the synchronous loop's result, with the stages on threads. Queues
between the stages hold one batch each. An exception on a worker thread stops the pipeline and is raised where the
records are read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

POLL_SECONDS = 0.1
"""How often a blocked stage looks whether the pipeline was stopped."""


class Mailbox:
    """The newest policy weights the learner has published, for the generator to take between batches."""

    def __init__(self):
        self._lock = threading.Lock()
        self._item: tuple[int, Any] | None = None

    def put(self, version: int, weights: Any) -> None:
        with self._lock:
            self._item = (version, weights)

    def take(self) -> tuple[int, Any] | None:
        """(version, weights) published since the last take, or None."""
        with self._lock:
            item, self._item = self._item, None
            return item


class StalenessError(RuntimeError):
    pass


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Version:
    """The learner's policy version, which the generator waits on."""

    def __init__(self, value: int):
        self.value = value
        self._changed = threading.Condition()

    def advance(self, value: int) -> None:
        with self._changed:
            self.value = value
            self._changed.notify_all()

    def wait_for(self, least: int, stop: threading.Event) -> bool:
        with self._changed:
            while self.value < least and not stop.is_set():
                self._changed.wait(POLL_SECONDS)
            return not stop.is_set()


def run_pipeline(
    steps: range, generate: Callable[[int], tuple[int, Any]], score: Callable[[int, Any], Any],
    learn: Callable[[int, int, Any], dict], max_staleness: int, asynchronous: bool = True, threads: int | None = None,
) -> Iterator[dict]:
    """The learner's record of every step of `steps`, in order; each record gains `policy_version` (of the batch's
    behaviour policy) and `staleness` (versions between it and the learner). `threads`: the intra-op threads each
    stage's thread computes with when they run concurrently (on a CPU, cores / 2 keeps two busy stages from
    oversubscribing the cores); None leaves torch's setting."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be at least 0, got {max_staleness}")
    if not asynchronous:
        for step in steps:
            version, generated = generate(step)
            yield _learn(learn, step, version, score(step, generated), max_staleness)
        return
    learned, stop = _Version(steps.start), threading.Event()
    generated_q: queue.Queue = queue.Queue(maxsize=1)
    scored_q: queue.Queue = queue.Queue(maxsize=1)

    def producer() -> None:
        for step in steps:
            if not learned.wait_for(step - max_staleness, stop):
                return
            _put(generated_q, (step, *generate(step)), stop)

    def scorer() -> None:
        for step in steps:
            item = _get(generated_q, stop)
            if item is None:
                return
            if isinstance(item, _Failed):
                _put(scored_q, item, stop)
                return
            _, version, generated = item
            _put(scored_q, (step, version, score(step, generated)), stop)

    workers = [threading.Thread(target=_guarded(body, queue_, stop, threads), name=f"pipeline-{body.__name__}",
                                daemon=True) for body, queue_ in ((producer, generated_q), (scorer, scored_q))]
    learner_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    for worker in workers:
        worker.start()
    try:
        for step in steps:
            item = _get(scored_q, stop)
            if isinstance(item, _Failed):
                raise item.error
            _, version, scored = item
            record = _learn(learn, step, version, scored, max_staleness)
            learned.advance(step + 1)
            yield record
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        torch.set_num_threads(learner_threads)


def _learn(learn, step: int, version: int, scored: Any, max_staleness: int) -> dict:
    staleness = step - version
    if staleness > max_staleness:
        raise StalenessError(f"batch {step} was sampled by policy version {version}, {staleness} versions behind the "
                             f"learner (at most {max_staleness})")
    return learn(step, version, scored) | {"policy_version": version, "staleness": staleness}


def _guarded(body: Callable[[], None], out: queue.Queue, stop: threading.Event, threads: int | None
             ) -> Callable[[], None]:
    """The stage's body; an exception goes down the pipeline to the learner, which raises it."""
    def run() -> None:
        try:
            if threads is not None:  # under OpenMP the setting is the calling thread's own
                torch.set_num_threads(threads)
            body()
        except BaseException as err:  # noqa: BLE001 (re-raised on the learner's thread)
            _put(out, _Failed(err), stop)
    return run


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_SECONDS)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
    return None
