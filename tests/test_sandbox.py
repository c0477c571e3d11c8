"""The code sandbox (stages.envs.sandbox): what each isolation level gives, the refusals, the limits, and a corpus of
hostile programs, each contained in its namespaces and scored 0 while the test process stays untouched."""

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.errors import UserError
from stages.envs import code as code_module
from stages.envs import sandbox
from stages.envs.code import CodeTask
from stages.envs.sandbox import PROCESS_ONLY, PROCESSES, Execution, Runner, SandboxError, run_python

ADD_THREE = {"tests": ["assert add_three(1) == 4", "assert add_three(-3) == 0"]}
CORRECT = "def add_three(x):\n    return x + 3\n"
WRONG = "def add_three(x):\n    return x\n"
FAILURE = sandbox.namespace_failure()
needs_namespaces = pytest.mark.skipif(FAILURE is not None, reason=f"no namespaces here: {FAILURE}")
LEVELS = ["process", pytest.param("namespaces", marks=needs_namespaces)]


def fenced(code: str) -> str:
    return f"```python\n{code}\n```\n"


class Recorder(Runner):
    """A Runner that keeps what each program did, to check what the programs saw."""

    def run(self, source: str, stdin: bytes = b"") -> Execution:
        self.last = super().run(source, stdin)
        return self.last


@pytest.fixture
def task():
    """Small limits, so the hostile programs end fast; namespaces or nothing."""
    return CodeTask(Recorder(concurrent=2, timeout=1.5, memory_mb=256, isolation="namespaces"))


@pytest.fixture(autouse=True)
def untouched(tmp_path):
    """Every test leaves the test process as it found it: environment, working directory and a file of its own."""
    environ = lambda: {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own
    before, cwd = environ(), os.getcwd()
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    yield
    assert (environ(), os.getcwd(), canary.read_text()) == (before, cwd, "original")


STARTED = """\
deadline = time.time() + 5
while not any({marker!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read()
              for pid in os.listdir('/proc') if pid.isdigit()) and time.time() < deadline:
    time.sleep(0.01)
print('started', flush=True)
"""
"""Program lines that wait until a process with `marker` runs, then say so: proof that a test's escapee exists."""


def processes_with(marker: str) -> list[int]:
    """The live processes on this machine whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found


def gone(marker: str, seconds: float = 5.0) -> bool:
    """No process with `marker` is left, after giving a dying namespace a moment."""
    deadline = time.perf_counter() + seconds
    while processes_with(marker) and time.perf_counter() < deadline:
        time.sleep(0.05)
    return not processes_with(marker)


# --- what every level gives ---------------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_a_plain_program_runs_in_an_empty_environment(level):
    run = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\nprint(sys.stdin.read())",
                     stdin=b"given", isolation=level)
    environ, isolated, stdin = run.stdout.splitlines()
    assert run.exit_code == 0 and not (run.timed_out or run.truncated)
    assert environ in ("[]", "['LC_CTYPE']")  # the interpreter's own locale coercion (PEP 538), nothing of ours
    assert (isolated, stdin) == ("1", "given")


@pytest.mark.parametrize("level", LEVELS)
def test_output_is_capped_without_hanging(level):
    start = time.perf_counter()
    run = run_python("while True:\n    print('x' * 10_000)", timeout=30, output_bytes=5_000, isolation=level)
    assert run.truncated and len(run.stdout) == 5_000 and time.perf_counter() - start < 5


@pytest.mark.parametrize("level", LEVELS)
def test_memory_is_limited(level):
    run = run_python("data = bytearray(2 * 2**30)", memory_mb=256, isolation=level)
    assert run.exit_code == 1 and "MemoryError" in run.stderr


def test_stdin_must_fit_a_pipe():
    with pytest.raises(ValueError, match="at most"):
        run_python("pass", stdin=b"x" * (sandbox.STDIN_BYTES + 1), isolation="process")


def test_runner_runs_many_in_order():
    runs = Runner(concurrent=2, allow_weak_isolation=True).run_many([f"print({i} * {i})" for i in range(5)])
    assert [run.stdout for run in runs] == [f"{i * i}\n" for i in range(5)]


def test_process_level_kills_the_process_group_on_timeout():
    marker = f"n3-sandbox-test-{secrets.token_hex(4)}"
    source = (f"import os, time\nif os.fork() == 0:\n    os.execv('/bin/sleep', [{marker!r}, '30'])\n"
              + STARTED.format(marker=marker) + "while True:\n    pass\n")
    start = time.perf_counter()
    run = run_python(source, timeout=1.0, isolation="process")
    assert run.timed_out and run.exit_code == -9 and time.perf_counter() - start < 5
    assert run.stdout == "started\n" and gone(marker)


@needs_namespaces
def test_namespaces_show_only_the_programs_own_world(tmp_path):
    run = run_python("import os\nprint(os.getpid(), os.getppid(), os.getcwd())\nprint(sorted(os.listdir('/proc')))\n"
                     f"print([os.path.exists(p) for p in ({str(tmp_path)!r}, {str(Path(__file__))!r}, '/run')])\n"
                     "open('note.txt', 'w').write('scratch is writable')\n"
                     "print(sorted(os.listdir('.')))", isolation="namespaces")
    pids, proc, exists, files = run.stdout.splitlines()
    assert run.exit_code == 0, run.stderr
    assert pids == "1 0 /tmp"  # process 1 of its own PID namespace, working in its fresh /tmp
    assert [entry for entry in eval(proc) if entry.isdigit()] == ["1"]
    assert exists == "[False, False, False]"  # neither this test's files, nor the repository, nor host sockets
    # Besides its own files, only the top of an interpreter prefix that lies under /tmp (CI's virtual environment)
    # shows there, mirrored read-only.
    interpreter = {Path(p).parts[2] for p in sandbox._prefixes() if p.startswith("/tmp/")}
    assert eval(files) == sorted({"main.py", "note.txt", *interpreter})


# --- isolation levels and refusals --------------------------------------------------------------------------

@needs_namespaces
def test_auto_takes_namespaces_where_they_work():
    runner = Runner()
    assert runner.level == "namespaces" and runner.isolation.startswith("namespaces (")


def test_auto_refuses_without_namespaces_unless_weak_isolation_is_accepted(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_failure", lambda: "simulated")
    with pytest.raises(UserError, match=r"cannot use Linux namespaces here \(simulated\).*allow_weak_isolation"):
        print(Runner().isolation)
    with pytest.raises(UserError, match="simulated"):  # a refusal stops scoring; it is not a dropped sample
        CodeTask(Runner()).score(ADD_THREE, fenced(CORRECT))
    weak = Runner(allow_weak_isolation=True)
    assert weak.isolation == PROCESS_ONLY
    assert CodeTask(weak).score(ADD_THREE, fenced(CORRECT)).passed


def test_namespaces_asked_for_are_never_weakened(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_failure", lambda: "simulated")
    with pytest.raises(UserError, match="simulated"):
        Runner(isolation="namespaces", allow_weak_isolation=True).run("pass")
    assert Runner(isolation="process").isolation == PROCESS_ONLY
    with pytest.raises(UserError, match="unknown sandbox isolation 'chroot'"):
        Runner(isolation="chroot")


def test_the_probe_says_why_namespaces_fail(monkeypatch):
    monkeypatch.setattr(sandbox, "UNSHARE", None)
    assert "unshare is not on PATH" in sandbox.namespace_failure.__wrapped__()


@pytest.mark.parametrize("level", LEVELS)
def test_a_runner_failure_is_an_error_not_a_zero(level, monkeypatch):
    task = CodeTask(Runner(isolation=level))
    assert task.runner.level == level  # settled before the interpreter goes missing
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    score = task.score(ADD_THREE, fenced(CORRECT))
    assert score.error and not score.passed and "could not start" in score.reason


@needs_namespaces
def test_a_setup_failure_inside_the_namespaces_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "ISOLATION", str(tmp_path / "missing.py"))
    with pytest.raises(SandboxError, match="could not start the program in its namespaces"):
        run_python("pass", isolation="namespaces")


# --- the hostile corpus, under namespaces -------------------------------------------------------------------

@needs_namespaces
def test_a_correct_solution_passes(task):
    score = task.score(ADD_THREE, fenced(CORRECT))
    assert (score.reward, score.passed, score.reason, score.error) == (1.0, True, "correct", False)


def zero(task, code: str) -> str:
    """Score `code` against ADD_THREE, check it got 0 as a program failure (not a runner error); its reason."""
    score = task.score(ADD_THREE, fenced(code))
    assert (score.reward, score.passed, score.error) == (0.0, False, False), score
    return score.reason


@needs_namespaces
def test_a_fork_bomb_is_capped_and_leaves_nothing(task):
    marker = f"n3-sandbox-test-{secrets.token_hex(4)}"
    bomb = ("import os\nchildren = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            f"            os.execv('/bin/sleep', [{marker!r}, '30'])\n        children += 1\nexcept OSError:\n"
            "    print('children', children, flush=True)\nwhile True:\n    pass\n")
    assert zero(task, bomb) == "timed out after 1.5 s"
    children = int(task.runner.last.stdout.split()[1])
    assert children < PROCESSES  # RLIMIT_NPROC held, root or not
    assert gone(marker)


@needs_namespaces
@pytest.mark.parametrize("code, reason", [
    ("while True:\n    pass", "timed out after 1.5 s"),
    ("data = []\nwhile True:\n    data.append(bytearray(2**26))", "MemoryError"),
    ("import os\nwhile True:\n    os.write(1, b'x' * 2**20)", "output passed 64000 bytes"),
    ("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)", "OSError: [Errno 27] File too large"),
], ids=["infinite loop", "memory bomb", "gigabytes of output", "huge file"])
def test_runaway_programs_are_stopped(task, code, reason):
    assert zero(task, code) == reason


@needs_namespaces
def test_no_network_not_even_loopback(task):
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0n3-sandbox-test-{secrets.token_hex(4)}")
    abstract.listen()
    port, name = listener.getsockname()[1], abstract.getsockname()
    attempts = (f"import socket\nfor family, address in ((socket.AF_INET, ('127.0.0.1', {port})), "
                f"(socket.AF_UNIX, {name!r})):\n    try:\n        socket.socket(family).connect(address)\n"
                "        print('connected')\n    except OSError as e:\n        print(type(e).__name__)\n" + WRONG)
    try:
        assert zero(task, attempts) == "test 1 failed: AssertionError"
        assert task.runner.last.stdout.split() == ["OSError", "ConnectionRefusedError"]
        for server in (listener, abstract):
            server.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing is waiting to be accepted
                server.accept()
    finally:
        listener.close()
        abstract.close()


@needs_namespaces
def test_no_write_reaches_outside(task, tmp_path):
    canary, new = tmp_path / "canary.txt", tmp_path / "new.txt"
    targets = [str(canary), str(new), str(Path(sandbox.__file__)), "/usr/n3-sandbox-test", "/etc/passwd"]
    attempts = (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('forged')\n"
                "        print('wrote', path)\n    except OSError as e:\n        print(type(e).__name__)\n" + WRONG)
    assert zero(task, attempts) == "test 1 failed: AssertionError"
    assert "wrote" not in task.runner.last.stdout
    assert canary.read_text() == "original" and not new.exists() and not Path("/usr/n3-sandbox-test").exists()
    assert "forged" not in Path(sandbox.__file__).read_text()


@needs_namespaces
def test_killing_its_parent_or_group_reaches_nothing_outside(task):
    neighbour = subprocess.Popen(["sleep", "30"], start_new_session=True)
    # Only signal everything (-1) from inside a PID namespace: a regression must not take the machine down.
    attempts = ("import os, signal\nprint('pid', os.getpid(), flush=True)\n"
                "for kill in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL),\n"
                "             lambda: os.getpid() == 1 and os.kill(-1, signal.SIGKILL),\n"
                f"             lambda: os.kill({os.getpid()}, signal.SIGKILL),\n"
                f"             lambda: os.killpg({os.getpgid(0)}, signal.SIGKILL)):\n"
                "    try:\n        kill()\n    except OSError as e:\n        print(type(e).__name__)\n" + WRONG)
    try:
        assert zero(task, attempts) == "test 1 failed: AssertionError"
        assert task.runner.last.stdout.startswith("pid 1\n")
        assert neighbour.poll() is None  # this test process is alive too, or it would not be here
    finally:
        neighbour.kill()
        neighbour.wait()


@needs_namespaces
def test_the_parents_environment_stays_hidden(task, monkeypatch):
    secret = f"n3-sandbox-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("N3_SANDBOX_SECRET", secret)
    attempts = ("import os\nprint(dict(os.environ))\n"
                "for pid in [os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                "    except OSError as e:\n        print(type(e).__name__)\n" + WRONG)
    assert zero(task, attempts) == "test 1 failed: AssertionError"
    assert secret not in task.runner.last.stdout
    assert task.runner.last.stdout.splitlines()[0] in ("{}", "{'LC_CTYPE': 'C.UTF-8'}")


@needs_namespaces
@pytest.mark.parametrize("code, reason", [
    (WRONG + "import sys\nsys.exit(0)", "exited before the tests finished"),
    (WRONG + "import os\nos._exit(0)", "exited before the tests finished"),
    (WRONG + "raise SystemExit", "exited before the tests finished"),
    (WRONG + "import os, sys\nsys.excepthook = lambda *e: os._exit(0)", "exited before the tests finished"),
    (WRONG + "import sys\nsys.excepthook = lambda *e: None", "exit code 1"),
    (WRONG + "import builtins\nbuiltins.AssertionError = type('Nothing', (Exception,), {})",
     "test 1 failed: AssertionError"),
    (WRONG + "import builtins, os, sys\nbuiltins.print = builtins.exit = sys.exit = os._exit = lambda *a: None",
     "test 1 failed: AssertionError"),
    (WRONG + "import atexit, os\natexit.register(os._exit, 0)", "exited before the tests finished"),
], ids=["sys.exit", "os._exit", "SystemExit", "excepthook exits", "excepthook swallows", "AssertionError",
        "builtins", "atexit"])
def test_cheats_on_the_harness_fail(task, code, reason):
    assert zero(task, code) == reason


@needs_namespaces
def test_its_own_source_does_not_forge_the_pass(task, monkeypatch):
    nonce = secrets.token_hex(16)
    monkeypatch.setattr(code_module.secrets, "token_hex", lambda n: nonce)
    forge = ("import os, sys\nprint(open(sys.argv[0]).read())\nprint(open('/proc/self/cmdline').read())\n"
             "print(open('/proc/self/environ').read())\nprint(os.listdir('/proc/self/fd'))\n"
             "for fd in range(64):\n    try:\n        print(os.read(fd, 100))\n    except OSError:\n        pass\n"
             + WRONG + "sys.stdout.flush()\nos._exit(0)")
    assert zero(task, forge) == "exited before the tests finished"
    assert "def main" in task.runner.last.stdout and nonce not in task.runner.last.stdout


@needs_namespaces
def test_a_child_in_a_session_of_its_own_dies_with_the_program(task):
    marker = f"n3-sandbox-test-{secrets.token_hex(4)}"
    escape = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv('/bin/sleep', [{marker!r}, '30'])\n    os._exit(0)\n" + STARTED.format(marker=marker)
              + WRONG)
    assert zero(task, escape) == "test 1 failed: AssertionError"
    assert task.runner.last.stdout == "started\n"
    assert gone(marker)
