"""Run a Python program in a child process under limits and, where Linux allows, in namespaces of its own: the code
domain's program runner.

Every program, whatever the isolation: a fresh interpreter (`python -I`: no user site-packages, its own directory
not on sys.path) with an empty environment, in a session of its own, with stdin holding only what the caller gave
(then end of file), under rlimits on CPU time, address space, file size, processes, open files and core dumps, and
a wall-clock timeout that kills its whole process group; its output is read as it comes and capped.

The isolation levels (`Runner(isolation=...)`; `Runner.isolation` says in words which one is in force):

- "namespaces" (stages.envs.isolation does the inside): new mount, PID, network and IPC namespaces, and a user
  namespace when n3 is not root. The program sees a filesystem of its own: read-only mirrors of the system
  directories (/usr, /lib, /etc...) and of the interpreter's prefixes, a /dev of null, zero, random and urandom,
  a /proc of its PID namespace alone, and a fresh size-capped tmpfs /tmp, its working directory and the only
  place it can write; the rest of the host (home directories, the repository, the caller's files, sockets under
  /run) is not there. It has no network, not even loopback, and it can neither see nor signal a process outside
  its namespace. It holds no privileges: under root it runs as an unprivileged uid picked for it (which is also
  what makes RLIMIT_NPROC bind: the kernel exempts uid 0), otherwise as root of a user namespace that maps only
  the caller's uid and grants no capabilities. It is process 1 of its PID namespace, so when it ends or the
  timeout kills it, everything it started dies with it, new sessions and double forks included. Not covered:
  the kernel itself (an exploit escapes any namespace); what the mirrored directories let it read (world-readable
  files for the unprivileged uid; what the caller can read, under a user namespace); CPU, memory and disk
  bandwidth shared with the host beyond the rlimits (there are no cgroups); timing side channels. It needs
  util-linux's `unshare` and Linux 5.12 or later, and costs about 20 ms a program over "process" (a second, bare
  interpreter sets the namespaces up).
- "process": the limits above and nothing more, as in nanochat's execution.py ("not a true security sandbox"). The
  program can read and write whatever the user running n3 can, reach the network, signal the user's processes
  (n3 included), and a grandchild that starts a session of its own escapes the group kill. RLIMIT_NPROC counts
  all of the user's processes, and the kernel ignores it for root, so as root nothing stops a fork bomb.
- "auto": namespaces where a probe program runs in them (tried once per n3 process); anywhere else it refuses
  (a UserError) unless the caller passed allow_weak_isolation=True, which takes "process" instead.
"""

from __future__ import annotations

import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

from model.errors import UserError

FILE_BYTES = 16 * 2**20
"""The largest file the program may write."""
OPEN_FILES = 64
PROCESSES = 64
"""RLIMIT_NPROC: the program's processes and threads together."""
STDIN_BYTES = 4096
"""The most stdin a program may be given: it is written before the program starts, so it must fit a pipe's buffer."""
READ_BYTES = 2**16
UID_FIRST, UID_COUNT = 2**30, 2**24
"""Under root, each program runs as a uid drawn from this range, where no ordinary account lives: a uid of its
own, so that RLIMIT_NPROC counts its processes alone."""
UNSHARE = shutil.which("unshare")
ISOLATION = str(Path(__file__).with_name("isolation.py"))
"""The setup that runs inside the namespaces, as a script: it must not import n3."""

ISOLATIONS = ("auto", "namespaces", "process")
PROCESS_ONLY = "process only (rlimits, no namespaces)"


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


def run_python(source: str, timeout: float = 5.0, memory_mb: int = 512, output_bytes: int = 64_000,
               stdin: bytes = b"", isolation: str = "auto", allow_weak_isolation: bool = False) -> Execution:
    """Run `source` as a Python program (main.py) under the limits above; stdout and stderr keep their first
    output_bytes. `stdin` is all the program can read on its standard input; `isolation` is a level above."""
    namespaces = isolation_level(isolation, allow_weak_isolation) == "namespaces"
    return _run(source, timeout, memory_mb, output_bytes, stdin, namespaces)


def isolation_level(isolation: str = "auto", allow_weak_isolation: bool = False) -> str:
    """The level that `isolation` comes to here, "namespaces" or "process"; a UserError where it cannot be had."""
    _check_isolation(isolation)
    if isolation == "process":
        return "process"
    failure = namespace_failure()
    if failure is None:
        return "namespaces"
    if isolation == "auto" and allow_weak_isolation:
        return "process"
    raise UserError(f"the code sandbox cannot use Linux namespaces here ({failure}); fix that, or accept weaker "
                    "isolation (allow_weak_isolation, --allow-weak-isolation: programs then run as plain processes "
                    "under rlimits)")


def _check_isolation(isolation: str) -> None:
    if isolation not in ISOLATIONS:
        raise UserError(f"unknown sandbox isolation {isolation!r}; choose one of {', '.join(ISOLATIONS)}")


def describe(level: str) -> str:
    """A level in words, to print with every run."""
    if level == "process":
        return PROCESS_ONLY
    if os.geteuid() == 0:
        return "namespaces (mount, pid, net, ipc; an unprivileged uid of its own)"
    return "namespaces (user, mount, pid, net, ipc; no capabilities)"


@cache
def namespace_failure() -> str | None:
    """Why programs cannot run in namespaces here, or None when a probe program does; found once per process."""
    if UNSHARE is None:
        return "util-linux's unshare is not on PATH"
    try:
        run = _run("print('ok')", 10.0, 512, 1000, b"", namespaces=True)
    except SandboxError as e:
        return str(e)
    if (run.exit_code, run.stdout) != (0, "ok\n"):
        return f"a probe program failed: {_last_line(run.stderr) or f'exit code {run.exit_code}'}"
    return None


def _run(source: str, timeout: float, memory_mb: int, output_bytes: int, stdin: bytes, namespaces: bool
         ) -> Execution:
    if len(stdin) > STDIN_BYTES:
        raise ValueError(f"stdin holds {len(stdin)} bytes; a program may be given at most {STDIN_BYTES}")
    limits = partial(_limit, math.ceil(timeout) + 1, memory_mb * 2**20, None if namespaces else PROCESSES)
    with tempfile.TemporaryDirectory(prefix="n3-run-") as scratch:
        (Path(scratch) / "main.py").write_text(source, encoding="utf-8")
        if not namespaces:
            return _execute([sys.executable, "-I", "main.py"], scratch, stdin, (), limits, timeout, output_bytes)
        status_read, status_write = os.pipe()
        try:
            run = _execute(_inside_namespaces(scratch, status_write), scratch, stdin, (status_write,), limits,
                           timeout, output_bytes)
            _check_started(status_read, run.stderr)
        finally:
            os.close(status_read)
            os.close(status_write)
        return run


def _inside_namespaces(scratch: str, status: int) -> list[str]:
    """The command that runs main.py in namespaces: unshare makes them, isolation.py sets them up from inside."""
    if os.geteuid() == 0:  # root needs no user namespace for privileges, and the program gets a uid of its own
        user, uid = [], UID_FIRST + secrets.randbelow(UID_COUNT)
    else:
        user, uid = ["--user", "--map-root-user"], 0
    # --kill-child: when unshare dies (the timeout kills its group), the kernel kills process 1, then the namespace
    return [UNSHARE or "unshare", *user, "--mount", "--pid", "--net", "--ipc", "--kill-child",
            "--propagation", "private", sys.executable, "-I", "-S", ISOLATION, scratch, str(status), str(uid),
            str(PROCESSES), sys.executable, *_prefixes()]


def _prefixes() -> set[str]:
    """Where the interpreter lives: what the namespaces must show the program, besides the system directories.
    Read here, not in isolation.py: under -S, which skips site.py, a venv's interpreter does not know its venv."""
    python = sys.executable
    return {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(python),
            os.path.dirname(os.path.realpath(python))}


def _execute(command: list[str], scratch: str, stdin: bytes, pass_fds: tuple[int, ...], limits: Callable[[], None],
             timeout: float, output_bytes: int) -> Execution:
    """Start `command` in `scratch`, collect its output until it ends or a limit stops it, kill its group."""
    start = time.perf_counter()
    process = _start(command, scratch, stdin, pass_fds, limits)
    stdout, stderr = bytearray(), bytearray()
    with process:
        try:
            timed_out, truncated = _collect(process, stdout, stderr, start + timeout, output_bytes)
        finally:
            _kill_group(process)
    return Execution(process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                     timed_out, truncated, time.perf_counter() - start)


def _start(command: list[str], scratch: str, stdin: bytes, pass_fds: tuple[int, ...], limits: Callable[[], None]
           ) -> subprocess.Popen:
    read, write = os.pipe()
    with open(write, "wb") as pipe:  # all of it fits the pipe's buffer (STDIN_BYTES), so this cannot block
        pipe.write(stdin)
    try:
        return subprocess.Popen(command, cwd=scratch, env={}, stdin=read, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, pass_fds=pass_fds, preexec_fn=limits)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"could not start {command[0]}: {e}") from e
    finally:
        os.close(read)


def _check_started(status_read: int, stderr: str) -> None:
    """Raise SandboxError unless isolation.py reported that it set the namespaces up and went on to exec."""
    os.set_blocking(status_read, False)
    try:
        status = os.read(status_read, READ_BYTES)
    except BlockingIOError:  # nothing was written: unshare or the interpreter failed before isolation.py ran
        status = b""
    if status != b"ok":
        why = status.removeprefix(b"ok").decode("utf-8", "replace") or _last_line(stderr) or "no reason given"
        raise SandboxError(f"could not start the program in its namespaces: {why}")


def _last_line(text: str) -> str:
    return next((line for line in reversed(text.splitlines()) if line.strip()), "")


def _limit(cpu_seconds: int, memory_bytes: int, processes: int | None) -> None:
    """Runs in the child between fork and exec. It calls only into the already-imported resource module, which is
    what keeps preexec_fn safe when the parent has other threads (a Runner's callers). In namespaces, isolation.py
    sets RLIMIT_NPROC itself, once the namespace it counts in exists."""
    limits = [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
              (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_NOFILE, OPEN_FILES), (resource.RLIMIT_CORE, 0)]
    if processes is not None:
        limits.append((resource.RLIMIT_NPROC, processes))
    for kind, value in limits:
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
    """SIGKILL the program's process group (its session leader is the program, or unshare in namespaces): a
    running program, or the children an exited one left behind. In namespaces the group holds only unshare, whose
    death kills process 1 (--kill-child) and so the namespace; process 1 is also killed by pid, because a setup
    that changes uid loses that death signal for the instant before it sets it again (isolation.py)."""
    for pid in _children(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # the group is already gone
        pass
    process.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone, or a kernel without CONFIG_PROC_CHILDREN: the death signal alone stands
        return []


class Runner:
    """run_python with fixed limits and isolation, and at most `concurrent` programs at once, however many threads
    call it. The isolation level is settled on first use (`isolation` says it in words, and raises the UserError
    if it cannot be had), not at construction, so building a Runner costs nothing anywhere."""

    def __init__(self, concurrent: int = os.cpu_count() or 1, timeout: float = 5.0, memory_mb: int = 512,
                 output_bytes: int = 64_000, isolation: str = "auto", allow_weak_isolation: bool = False):
        _check_isolation(isolation)
        self.concurrent = concurrent
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.output_bytes = output_bytes
        self.requested = isolation
        self.allow_weak_isolation = allow_weak_isolation
        self._slots = threading.BoundedSemaphore(concurrent)

    @property
    def level(self) -> str:
        """What `requested` comes to on this machine: "namespaces" or "process"."""
        return isolation_level(self.requested, self.allow_weak_isolation)

    @property
    def isolation(self) -> str:
        """The isolation in force, in words: "namespaces (...)" or "process only (...)"."""
        return describe(self.level)

    def run(self, source: str, stdin: bytes = b"") -> Execution:
        namespaces = self.level == "namespaces"
        with self._slots:
            return _run(source, self.timeout, self.memory_mb, self.output_bytes, stdin, namespaces)

    def run_many(self, sources: Sequence[str]) -> list[Execution]:
        """Run every source, `concurrent` at a time; results in the order of `sources`."""
        with ThreadPoolExecutor(self.concurrent) as pool:
            return list(pool.map(self.run, sources))
