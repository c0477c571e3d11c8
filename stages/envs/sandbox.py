"""Run a Python program in a child process under limits: the code domain's program runner.

What isolation this gives, plainly: each program runs in a fresh interpreter (`python -I`: no environment
variables, no user site-packages, its own directory not on sys.path) in a new session, with stdin closed, in a
scratch directory that is removed afterwards, under rlimits on CPU time, address space, file size, open files and
core dumps, and a wall-clock timeout that kills its whole process group. Its output is read as it comes and capped.
That is all: it is a process with limits, not a security boundary. The program can read and write whatever the
user running n3 can, the filesystem outside its scratch directory included, reach the network, and a child that
starts a session of its own escapes the group kill (as in nanochat's execution.py, "not a true security
sandbox"). A namespace-based sandbox (filesystem, network and PID isolation) can stand behind the same
run_python interface.
"""

from __future__ import annotations

import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

FILE_BYTES = 16 * 2**20
"""The largest file the program may write."""
OPEN_FILES = 64
READ_BYTES = 2**16


@dataclass
class Execution:
    exit_code: int
    """The process's exit status; negative: killed by that signal (-9 after a timeout or too much output)."""
    stdout: str
    stderr: str
    timed_out: bool
    """The wall-clock timeout passed: the process group was killed."""
    truncated: bool
    """A stream passed output_bytes: it was cut there and the process group was killed."""
    seconds: float


class SandboxError(RuntimeError):
    """The program could not be started: the runner failed, not the program."""


def run_python(source: str, timeout: float = 5.0, memory_mb: int = 512, output_bytes: int = 64_000) -> Execution:
    """Run `source` as a Python program under the limits above; stdout and stderr keep their first output_bytes."""
    with tempfile.TemporaryDirectory(prefix="n3-run-") as scratch:
        (Path(scratch) / "main.py").write_text(source, encoding="utf-8")
        start = time.perf_counter()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "main.py"], cwd=scratch, env={}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=partial(_limit, math.ceil(timeout) + 1, memory_mb * 2**20),
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxError(f"could not start {sys.executable}: {e}") from e
        stdout, stderr = bytearray(), bytearray()
        with process:
            try:
                timed_out, truncated = _collect(process, stdout, stderr, start + timeout, output_bytes)
            finally:
                _kill_group(process)
        return Execution(process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                         timed_out, truncated, time.perf_counter() - start)


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    """Runs in the child between fork and exec. It calls only into the already-imported resource module, which is
    what keeps preexec_fn safe when the parent has other threads (a Runner's callers)."""
    for kind, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                        (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_NOFILE, OPEN_FILES),
                        (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))


def _collect(process: subprocess.Popen, stdout: bytearray, stderr: bytearray, deadline: float, cap: int
             ) -> tuple[bool, bool]:
    """Read both pipes into stdout and stderr until they close and the process exits, the deadline passes or a
    pipe passes `cap` bytes; returns (timed_out, truncated)."""
    kept = {process.stdout: stdout, process.stderr: stderr}
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return True, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, READ_BYTES)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                buffer += chunk
                if len(buffer) > cap:
                    del buffer[cap:]
                    return False, True
    try:
        process.wait(max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:  # it closed its output but kept running
        return True, False
    return False, False


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the program's process group (its session leader is the program): a running program, or the
    children an exited one left behind."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # the group is already gone
        pass
    process.wait()


class Runner:
    """run_python with fixed limits and at most `concurrent` programs at once, however many threads call it."""

    def __init__(self, concurrent: int = os.cpu_count() or 1, timeout: float = 5.0, memory_mb: int = 512,
                 output_bytes: int = 64_000):
        self.concurrent = concurrent
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.output_bytes = output_bytes
        self._slots = threading.BoundedSemaphore(concurrent)

    def run(self, source: str) -> Execution:
        with self._slots:
            return run_python(source, self.timeout, self.memory_mb, self.output_bytes)

    def run_many(self, sources: Sequence[str]) -> list[Execution]:
        """Run every source, `concurrent` at a time; results in the order of `sources`."""
        with ThreadPoolExecutor(self.concurrent) as pool:
            return list(pool.map(self.run, sources))
