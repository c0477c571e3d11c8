"""The math domain: integer arithmetic and short word problems, answered as \\boxed{N} and checked with math-verify.

Levels:
    1  What is 7 - 3?           single digits, + and - (results >= 0), worked by counting one step at a time
    2  What is 47 + 38?         two-digit + and -, worked in columns with carries and borrows
    3  What is 7 * 46?          a one-digit number times a one- or two-digit number, in columns
    4  Tom has 12 pens and loses 3. How many pens does Tom have left?       one step (+, - or *), small numbers
    5  Tom has 12 pens and buys 7 more and then gives away 5. How many ...  two steps

The worked steps are the same at every level (one `steps` function), so what a small model learns on the lower
levels is what the word problems use. Only the last \\boxed{} of a completion counts, and without one the answer
scores 0: a checker that falls back to the whole text rewards answers that merely mention the number. The boxed
answer is compared with the gold one (data {"answer": a number or a LaTeX string}) by math-verify, in checker
processes whose timeouts work from any thread (`equivalent`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stages.envs.base import GeneratedTask, Problem, Score, Space

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Zoe")
THINGS = ("apples", "pens", "books", "cards", "shells", "coins", "stamps", "marbles")
DIGITS = range(10)
TWO_DIGITS = range(10, 100)
FACTORS = range(2, 10)
"""The one-digit factor of a multiplication (0 and 1 teach nothing)."""
SMALL = range(2, 10)
COUNTS = range(2, 31)
"""How many things a word problem's character starts with."""


def steps(a: int, op: str, b: int) -> str:
    """A worked computation of `a op b`, ending "= result." (single digits count, larger numbers go in columns)."""
    if op == "*":
        return _multiply(a, b)
    if a < 10 and b < 10:
        return _count(a, op, b)
    return _add_columns(a, b) if op == "+" else _subtract_columns(a, b)


def _count(a: int, op: str, b: int) -> str:
    """7 - 3 = 6 - 2 = 5 - 1 = 4 - 0 = 4: each step moves one unit, so only next and previous numbers are needed;
    addition counts the smaller number onto the larger."""
    big, small = (max(a, b), min(a, b)) if op == "+" else (a, b)
    chain = [f"{a} {op} {b}"] + ([f"{big} + {small}"] if (big, small) != (a, b) else [])
    sign = 1 if op == "+" else -1
    chain += [f"{big + sign * i} {op} {small - i}" for i in range(1, small + 1)]
    return " = ".join(chain + [str(a + b if op == "+" else a - b)]) + "."


def _add_columns(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    return (f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10}, carry {carry}. "
            f"Tens: {a // 10} + {b // 10} + {carry} = {tens}. So {a} + {b} = {a + b}.")


def _subtract_columns(a: int, b: int) -> str:
    borrow = int(a % 10 < b % 10)
    top = a % 10 + 10 * borrow
    tens = a // 10 - b // 10 - borrow
    return (f"Ones: {top} - {b % 10} = {top - b % 10}, borrow {borrow}. "
            f"Tens: {a // 10} - {b // 10} - {borrow} = {tens}. So {a} - {b} = {a - b}.")


def _multiply(a: int, b: int) -> str:
    if a < 10 and b < 10:
        return f"{a} * {b} = {a * b}."
    number, digit = (a, b) if b < 10 else (b, a)
    swap = f"{a} * {b} = {number} * {digit}. " if number != a else ""
    ones = number % 10 * digit
    tens = number // 10 * digit
    return (f"{swap}Ones: {number % 10} * {digit} = {ones}, write {ones % 10}, carry {ones // 10}. "
            f"Tens: {number // 10} * {digit} = {tens}, {tens} + {ones // 10} = {tens + ones // 10}. "
            f"So {a} * {b} = {a * b}.")


APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _problem(level: int, prompt: str, reasoning: str, answer: int, key: str) -> Problem:
    """A problem whose key is its arithmetic, whatever the story around it: a sum in the test split is one that
    training never works, neither bare nor in a word problem."""
    return Problem("math", level, prompt, reasoning, f"The answer is \\boxed{{{answer}}}.", {"answer": str(answer)},
                   key=key)


def _expression(level: int, op: str, a: int, b: int) -> Problem:
    return _problem(level, f"What is {a} {op} {b}?", steps(a, op, b), APPLY[op](a, b), f"{a} {op} {b}")


def _sums(level: int):
    """The build of a level's a + b and a - b problems (those that stay at or above zero)."""
    return lambda op, a, b: None if op == "-" and a < b else _expression(level, op, a, b)


def _times(digit_first: bool, digit: int, number: int) -> Problem | None:
    if digit_first:
        return _expression(3, "*", digit, number)
    # number * digit with a one-digit number is digit * number read the other way: counted once, digit first.
    return None if number < 10 else _expression(3, "*", number, digit)


@dataclass(frozen=True)
class Story:
    """One step of a word problem: what happens, the question it ends with, and why that is the operation."""

    op: str
    event: str
    question: str
    why: str
    first: range = COUNTS
    """The numbers the step may start from (what the character has)."""


ONE_STEP = (
    Story("+", "{name} has {a} {things} and buys {b} more.", "How many {things} does {name} have now?",
          "Buying more adds"),
    Story("+", "{name} has {a} {things} and finds {b} more.", "How many {things} does {name} have now?",
          "Finding more adds"),
    Story("-", "{name} has {a} {things} and gives away {b}.", "How many {things} does {name} have left?",
          "Giving away subtracts", range(10, 31)),
    Story("-", "{name} has {a} {things} and loses {b}.", "How many {things} does {name} have left?",
          "Losing subtracts", range(10, 31)),
    Story("*", "{name} has {a} bags with {b} {things} in each.", "How many {things} does {name} have?",
          "Equal bags multiply", SMALL),
    Story("*", "{name} buys {a} boxes of {b} {things}.", "How many {things} does {name} have?",
          "Equal boxes multiply", SMALL),
)
THEN = (
    ("+", "then buys {c} more", "Buying more adds"),
    ("-", "then gives away {c}", "Giving away subtracts"),
)
"""The second step of a two-step problem."""


def _one_step(story: Story, name: str, things: str, a: int, b: int) -> Problem | None:
    if a not in story.first:
        return None
    event = story.event.format(name=name, things=things, a=a, b=b)
    prompt = f"{event} {story.question.format(name=name, things=things)}"
    reasoning = f"{story.why}: {a} {story.op} {b}. {steps(a, story.op, b)}"
    return _problem(4, prompt, reasoning, APPLY[story.op](a, b), f"{a} {story.op} {b}")


def _two_steps(story: Story, then: tuple[str, str, str], name: str, things: str, a: int, b: int, c: int
               ) -> Problem | None:
    op, event, why = then
    if a not in story.first:
        return None
    middle = APPLY[story.op](a, b)
    if op == "-" and c > middle:
        return None
    first = story.event.format(name=name, things=things, a=a, b=b).removesuffix(".")
    prompt = f"{first} and {event.format(c=c)}. {story.question.format(name=name, things=things)}"
    reasoning = (f"First, {story.why.lower()}: {a} {story.op} {b}. {steps(a, story.op, b)} "
                 f"Then, {why.lower()}: {middle} {op} {c}. {steps(middle, op, c)}")
    return _problem(5, prompt, reasoning, APPLY[op](middle, c), f"({a} {story.op} {b}) {op} {c}")


SPACES = {
    1: Space((("+", "-"), DIGITS, DIGITS), _sums(1)),
    2: Space((("+", "-"), TWO_DIGITS, TWO_DIGITS), _sums(2)),
    3: Space(((True, False), FACTORS, range(2, 100)), _times),
    4: Space((ONE_STEP, NAMES, THINGS, COUNTS, SMALL), _one_step),
    5: Space((ONE_STEP, THEN, NAMES, THINGS, COUNTS, SMALL, SMALL), _two_steps),
}

BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """What the last \\boxed{...} of `text` holds (braces balanced); None when there is none or it is cut off."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 0
    for end in range(start + len(BOXED) - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + len(BOXED):end]
    return None


TIMEOUT = 5
"""Seconds math-verify may take to parse each side and to compare them (its own timeouts, by signal.alarm)."""
STALL = 3 * TIMEOUT + 5
"""Seconds one check may take, its process's start included, before the process is killed: math-verify's alarms
interrupt Python code, not every long C call."""


def equivalent(gold: str, answer: str) -> bool | None:
    """math-verify's judgement (gold first); None when the check passed STALL seconds.

    Checks run in checker processes, on their main thread, because math-verify's timeouts use signal.alarm, which
    works only there, and RL scores from worker threads: without the alarm, sympy works on \\boxed{9^{9^{9}}} for
    good, holding the GIL, and the whole trainer stalls. Each check running at once has a process of its own, kept
    for later checks; one that passes STALL is killed, whatever it is stuck in."""
    with _IDLE_LOCK:
        checker = _IDLE.pop() if _IDLE else None
    checker = checker or _Checker()
    try:
        verdict = checker.check(gold, answer)
    except BaseException:
        checker.close()
        raise
    if verdict is not None:
        with _IDLE_LOCK:
            _IDLE.append(checker)
    return verdict


class _Checker:
    """A child interpreter that answers checks, one at a time, on its main thread: JSON lines [gold, answer,
    timeout] in, [true, verdict] or [false, "Error: message"] out."""

    def __init__(self):
        # A fresh interpreter, not a fork (the caller may hold threads and their locks) nor multiprocessing's spawn
        # (which re-runs a script's unguarded top level in the child), importing this package from where we do.
        root = str(Path(__file__).resolve().parents[2])
        environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from stages.envs.math import _serve; _serve()"], env=environment,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def check(self, gold: str, answer: str) -> bool | None:
        """The verdict, or None (and the process killed) when it takes over STALL seconds; a checker that fails
        raises."""
        self.process.stdin.write(json.dumps([gold, answer, TIMEOUT]) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], STALL)
        if not ready:
            self.close()
            return None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the math-verify process ended (exit status {self.process.wait()})")
        ok, verdict = json.loads(line)
        if not ok:
            raise RuntimeError(verdict)
        return verdict

    def close(self) -> None:
        self.process.kill()
        self.process.communicate()


_IDLE: list[_Checker] = []
_IDLE_LOCK = threading.Lock()


@atexit.register
def _close_idle() -> None:
    while _IDLE:
        _IDLE.pop().close()


def _serve() -> None:
    """A checker process's loop (see _Checker), until its input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this process
    from math_verify import parse, verify  # brings in sympy, which problem generation never needs

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeouts come back as verdicts, not warnings
    for line in sys.stdin:
        gold, answer, timeout = json.loads(line)
        try:
            verdict = verify(parse(BOXED + gold + "}", parsing_timeout=timeout),
                             parse(BOXED + answer + "}", parsing_timeout=timeout), timeout_seconds=timeout)
            reply = [True, bool(verdict)]
        except Exception as e:  # the checker failed, not the answer: the parent's score marks it an error
            reply = [False, f"{type(e).__name__}: {e}"]
        print(json.dumps(reply), flush=True)


class MathTask(GeneratedTask):
    name = "math"
    spaces = SPACES

    def score(self, data: dict, completion: str) -> Score:
        start = time.perf_counter()
        gold = data.get("answer")
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"math data needs a non-empty 'answer' (a number or a LaTeX string), got {data!r}")
        answer = last_boxed(completion)
        if answer is None:
            return Score(0.0, False, "no \\boxed{} answer", seconds=time.perf_counter() - start)
        try:
            correct = equivalent(gold, answer)
        except Exception as e:  # math-verify or sympy failed, not the answer: the sample is dropped, not scored 0
            return Score(0.0, False, f"checker failed: {type(e).__name__}: {e}", error=True,
                         seconds=time.perf_counter() - start)
        if correct is None:  # the answer's fault (a number too big to work out), as a math-verify timeout is
            return Score(0.0, False, f"checking {_short(answer)} took over {STALL:g} s",
                         seconds=time.perf_counter() - start)
        reason = "correct" if correct else f"wrong answer {_short(answer)} (expected {gold})"
        return Score(float(correct), correct, reason, seconds=time.perf_counter() - start)


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
