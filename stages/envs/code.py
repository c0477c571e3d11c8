"""The code domain: short Python function specs with hidden assert tests, answered as one ```python block.

Levels:
    1  add_three(x): x plus 3           one-line arithmetic on the argument
    2  shout(s): s in upper case        one string or list built-in (len, sum, max, sorted, slicing, upper...)
    3  count_evens(nums)                a loop or a condition
    4  running_total(nums)              a loop that keeps state, or two ideas together (digit sums, primes, vowels)

Scoring runs the last ```python block of the completion, then the tests, in a sandboxed child process
(stages.envs.sandbox) under a harness. The harness reads a fresh random nonce from its stdin and closes it before
the code runs, so the nonce is in no file, command line or environment the code can read, and writes it to stdout,
through a reference to os.write taken beforehand, only after the last test statement returned. A completion passes
only if the process exits 0 with the nonce on a line of its own: exiting early (sys.exit(0), os._exit(0)), swallowing
the failure (sys.excepthook), replacing builtins or AssertionError (an assert raises the real one regardless) and
printing its own source cannot pass. Expected values come from `solve`, written apart from the reference body, so
the reference tests check one against the other. Not caught: returning objects that compare equal to anything, and
code that reaches into the interpreter that runs it (walking the harness's frames or the garbage collector for the
nonce, a trace function that jumps over the tests, ctypes), which no harness in the same process can stop.
"""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from stages.envs.base import GeneratedTask, Problem, Score, Space
from stages.envs.sandbox import Execution, Runner, SandboxError

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()


@dataclass(frozen=True)
class Argument:
    """A kind of argument: the names a function may give it and the inputs its hidden tests call it with."""

    names: tuple[tuple[str, ...], ...]
    inputs: tuple[tuple, ...]


def _single(names: str, *inputs) -> Argument:
    return Argument(tuple((name,) for name in names.split()), tuple((value,) for value in inputs))


ARGUMENTS = {
    "int": _single("x n num value", 4, 0, -3, 15, 1),
    "natural": _single("x n num value", 12, 0, 7, 405, 1, 13, 10),
    "small": _single("x n num value", 5, 0, 1, 7),
    "pair": Argument((("a", "b"), ("x", "y"), ("m", "n")), ((3, 8), (7, 3), (-4, -4), (0, -9))),
    "nums": _single("nums values items data", [3, 1, 4, 1, 5], [], [-2, 0, 9, 6], [7], [4, -1, -6, 8, 4]),
    "nonempty": _single("nums values items data", [3, 1, 4, 1, 5], [-2, 0, 9, 6], [7], [-5, -1]),
    "text": _single("s text sentence phrase", "hello world", "", "Data Science", "banana", "Level up"),
}


@dataclass(frozen=True)
class Spec:
    """One function to write. `name`, `does`, `body` and `plan` are formatted with {x} and {y} (the argument names),
    {k} (the parameter; {k[0]} and {k[1]} when it is a pair) and {w} (an int parameter as a word: add_three)."""

    name: str
    does: str
    """What it returns, for the prompt: "returns {x} plus {k}"."""
    body: str
    """The reference function body."""
    plan: str
    """The reasoning: how the body does it."""
    solve: Callable
    """The expected value, solve(k, *arguments), written apart from `body`."""
    argument: str = "int"
    ks: tuple = (None,)


def upto(first: int, last: int) -> tuple[int, ...]:
    return tuple(range(first, last + 1))


def _factorial(n: int) -> int:
    return n * _factorial(n - 1) if n > 1 else 1


def _fizzbuzz(fizz: int, buzz: int, x: int) -> str:
    return {(True, True): "FizzBuzz", (True, False): "Fizz", (False, True): "Buzz"}.get(
        (x % fizz == 0, x % buzz == 0), str(x))


LETTERS = tuple("abcdefghilmnoprstuwy")
VOWEL_PAIRS = tuple((a, b) for a in "aeiou" for b in "aeiou" if a != b)
DIVISOR_PAIRS = ((2, 3), (3, 5), (2, 5), (3, 4), (4, 5), (2, 7), (3, 7), (5, 7))

LEVEL_1 = (
    Spec("add_{w}", "returns {x} plus {k}", "return {x} + {k}", "One expression: {x} + {k}.",
         lambda k, x: x + k, ks=upto(2, 20)),
    Spec("subtract_{w}", "returns {x} minus {k}", "return {x} - {k}", "One expression: {x} - {k}.",
         lambda k, x: x - k, ks=upto(2, 20)),
    Spec("times_{w}", "returns {x} times {k}", "return {x} * {k}", "One expression: {x} * {k}.",
         lambda k, x: x * k, ks=upto(2, 20)),
    Spec("remainder_{w}", "returns the remainder of {x} divided by {k}", "return {x} % {k}",
         "The remainder is the % operator: {x} % {k}.", lambda k, x: x % k, ks=upto(2, 20)),
    Spec("divide_{w}", "returns {x} divided by {k}, rounded down", "return {x} // {k}",
         "Division rounded down is the // operator: {x} // {k}.", lambda k, x: x // k, ks=upto(2, 20)),
    Spec("square", "returns {x} squared", "return {x} * {x}", "One expression: {x} * {x}.", lambda k, x: x * x),
    Spec("negate", "returns {x} with its sign flipped", "return -{x}", "One expression: -{x}.", lambda k, x: -x),
)
LEVEL_2 = (
    Spec("count_items", "returns how many items are in {x}", "return len({x})", "len gives the number of items.",
         lambda k, x: len(x), "nums"),
    Spec("total", "returns the sum of the numbers in {x}", "return sum({x})", "sum adds up the numbers.",
         lambda k, x: sum(x), "nums"),
    Spec("largest", "returns the largest number in {x}", "return max({x})", "max gives the largest number.",
         lambda k, x: max(x), "nonempty"),
    Spec("smallest", "returns the smallest number in {x}", "return min({x})", "min gives the smallest number.",
         lambda k, x: min(x), "nonempty"),
    Spec("sort_numbers", "returns the numbers in {x} from smallest to largest", "return sorted({x})",
         "sorted returns a new list in order.", lambda k, x: sorted(x), "nums"),
    Spec("reverse_list", "returns the items of {x} in reverse order", "return {x}[::-1]",
         "The slice [::-1] reverses a list.", lambda k, x: x[::-1], "nums"),
    Spec("reverse_text", "returns the string {x} reversed", "return {x}[::-1]",
         "The slice [::-1] reverses a string.", lambda k, x: x[::-1], "text"),
    Spec("shout", "returns {x} in upper case", "return {x}.upper()", "The upper method gives upper case.",
         lambda k, x: x.upper(), "text"),
    Spec("whisper", "returns {x} in lower case", "return {x}.lower()", "The lower method gives lower case.",
         lambda k, x: x.lower(), "text"),
    Spec("count_words", "returns the number of words in {x}", "return len({x}.split())",
         "split breaks the text into words and len counts them.", lambda k, x: len(x.split()), "text"),
    Spec("first_{w}", "returns the first {k} items of {x}", "return {x}[:{k}]",
         "The slice [:{k}] keeps the first {k}.", lambda k, x: x[:k], "nums", upto(2, 10)),
    Spec("last_{w}", "returns the last {k} items of {x}", "return {x}[-{k}:]",
         "The slice [-{k}:] keeps the last {k}.", lambda k, x: x[-k:], "nums", upto(2, 10)),
    Spec("drop_first_{w}", "returns {x} without its first {k} items", "return {x}[{k}:]",
         "The slice [{k}:] drops the first {k}.", lambda k, x: x[k:], "nums", upto(1, 9)),
    Spec("repeat_{w}", "returns {x} repeated {k} times", "return {x} * {k}",
         "A string times {k} repeats it {k} times.", lambda k, x: x * k, "text", upto(2, 10)),
    Spec("count_{k}", 'returns how many times the letter "{k}" appears in {x}', 'return {x}.count("{k}")',
         'The count method counts "{k}".', lambda k, x: x.count(k), "text", LETTERS),
    Spec("replace_{k[0]}_with_{k[1]}", 'returns {x} with every "{k[0]}" replaced by "{k[1]}"',
         'return {x}.replace("{k[0]}", "{k[1]}")', 'The replace method swaps "{k[0]}" for "{k[1]}".',
         lambda k, x: x.replace(*k), "text", VOWEL_PAIRS),
)
LEVEL_3 = (
    Spec("count_evens", "returns how many numbers in {x} are even",
         "count = 0\nfor v in {x}:\n    if v % 2 == 0:\n        count += 1\nreturn count",
         "Loop over {x} and add 1 to a count for each v with v % 2 == 0.",
         lambda k, x: sum(v % 2 == 0 for v in x), "nums"),
    Spec("count_odds", "returns how many numbers in {x} are odd",
         "count = 0\nfor v in {x}:\n    if v % 2 == 1:\n        count += 1\nreturn count",
         "Loop over {x} and add 1 to a count for each v with v % 2 == 1.",
         lambda k, x: sum(v % 2 == 1 for v in x), "nums"),
    Spec("sum_evens", "returns the sum of the even numbers in {x}",
         "total = 0\nfor v in {x}:\n    if v % 2 == 0:\n        total += v\nreturn total",
         "Loop over {x} and add each v with v % 2 == 0 to a total.",
         lambda k, x: sum(v for v in x if v % 2 == 0), "nums"),
    Spec("count_above_{w}", "returns how many numbers in {x} are greater than {k}",
         "count = 0\nfor v in {x}:\n    if v > {k}:\n        count += 1\nreturn count",
         "Loop over {x} and add 1 to a count for each v > {k}.",
         lambda k, x: sum(v > k for v in x), "nums", upto(0, 20)),
    Spec("count_below_{w}", "returns how many numbers in {x} are less than {k}",
         "count = 0\nfor v in {x}:\n    if v < {k}:\n        count += 1\nreturn count",
         "Loop over {x} and add 1 to a count for each v < {k}.",
         lambda k, x: sum(v < k for v in x), "nums", upto(0, 20)),
    Spec("count_multiples_of_{w}", "returns how many numbers in {x} are divisible by {k}",
         "count = 0\nfor v in {x}:\n    if v % {k} == 0:\n        count += 1\nreturn count",
         "Loop over {x} and add 1 to a count for each v with v % {k} == 0.",
         lambda k, x: sum(v % k == 0 for v in x), "nums", upto(2, 9)),
    Spec("keep_above_{w}", "returns a list of the numbers in {x} that are greater than {k}",
         "return [v for v in {x} if v > {k}]", "A list comprehension keeps each v > {k}.",
         lambda k, x: [v for v in x if v > k], "nums", upto(0, 20)),
    Spec("keep_below_{w}", "returns a list of the numbers in {x} that are less than {k}",
         "return [v for v in {x} if v < {k}]", "A list comprehension keeps each v < {k}.",
         lambda k, x: [v for v in x if v < k], "nums", upto(0, 20)),
    Spec("add_to_each_{w}", "returns a list with {k} added to each number in {x}",
         "return [v + {k} for v in {x}]", "A list comprehension adds {k} to each v.",
         lambda k, x: [v + k for v in x], "nums", upto(1, 20)),
    Spec("times_each_{w}", "returns a list with each number in {x} multiplied by {k}",
         "return [v * {k} for v in {x}]", "A list comprehension multiplies each v by {k}.",
         lambda k, x: [v * k for v in x], "nums", upto(2, 10)),
    Spec("first_negative", "returns the first negative number in {x}, or None if there is none",
         "for v in {x}:\n    if v < 0:\n        return v\nreturn None",
         "Loop over {x} and return the first v < 0; after the loop return None.",
         lambda k, x: next((v for v in x if v < 0), None), "nums"),
    Spec("absolute", "returns {x} without its sign", "if {x} < 0:\n    return -{x}\nreturn {x}",
         "If {x} is negative return -{x}, else {x}.", lambda k, x: abs(x)),
    Spec("sign", "returns 1 if {x} is positive, -1 if it is negative and 0 if it is zero",
         "if {x} > 0:\n    return 1\nif {x} < 0:\n    return -1\nreturn 0",
         "Two conditions: {x} > 0 gives 1, {x} < 0 gives -1, else 0.", lambda k, x: (x > 0) - (x < 0)),
    Spec("clamp_{w}", "returns {x} limited to the range 0 to {k}",
         "if {x} < 0:\n    return 0\nif {x} > {k}:\n    return {k}\nreturn {x}",
         "Below 0 gives 0, above {k} gives {k}, else {x}.", lambda k, x: min(max(x, 0), k), ks=upto(2, 20)),
    Spec("is_divisible_by_{w}", "returns True if {x} is divisible by {k} and False otherwise",
         "return {x} % {k} == 0", "{x} is divisible by {k} when {x} % {k} == 0.",
         lambda k, x: x % k == 0, ks=upto(2, 12)),
    Spec("larger", "returns the larger of {x} and {y}", "if {x} > {y}:\n    return {x}\nreturn {y}",
         "If {x} > {y} return {x}, else {y}.", lambda k, x, y: max(x, y), "pair"),
    Spec("smaller", "returns the smaller of {x} and {y}", "if {x} < {y}:\n    return {x}\nreturn {y}",
         "If {x} < {y} return {x}, else {y}.", lambda k, x, y: min(x, y), "pair"),
    Spec("is_even", "returns True if {x} is even and False otherwise", "return {x} % 2 == 0",
         "{x} is even when {x} % 2 == 0.", lambda k, x: x % 2 == 0),
)
LEVEL_4 = (
    Spec("is_palindrome", "returns True if {x} reads the same forwards and backwards, ignoring case",
         "lowered = {x}.lower()\nreturn lowered == lowered[::-1]",
         "Lower the text, then compare it with its reverse.", lambda k, x: x.lower() == x.lower()[::-1], "text"),
    Spec("count_vowels", "returns how many letters of {x} are vowels (a, e, i, o, u), in either case",
         'count = 0\nfor c in {x}.lower():\n    if c in "aeiou":\n        count += 1\nreturn count',
         'Loop over the lowered text and count the letters in "aeiou".',
         lambda k, x: sum(c in "aeiou" for c in x.lower()), "text"),
    Spec("running_total", "returns the list of running totals of {x}",
         "totals = []\ntotal = 0\nfor v in {x}:\n    total += v\n    totals.append(total)\nreturn totals",
         "Keep a total, add each v to it and append the total to a list.",
         lambda k, x: [sum(x[: i + 1]) for i in range(len(x))], "nums"),
    Spec("unique", "returns the numbers in {x} without repeats, in the order they first appear",
         "seen = []\nfor v in {x}:\n    if v not in seen:\n        seen.append(v)\nreturn seen",
         "Loop over {x} and append each v not already in the result.", lambda k, x: list(dict.fromkeys(x)), "nums"),
    Spec("digit_sum", "returns the sum of the digits of the non-negative integer {x}",
         "total = 0\nwhile {x} > 0:\n    total += {x} % 10\n    {x} //= 10\nreturn total",
         "While {x} > 0, add {x} % 10 to a total and drop the last digit with //= 10.",
         lambda k, x: sum(map(int, str(x))), "natural"),
    Spec("count_digit_{w}", "returns how many times the digit {k} appears in the non-negative integer {x}",
         'return str({x}).count("{k}")', "Turn {x} into a string and count the character {k}.",
         lambda k, x: f"{x}".count(f"{k}"), "natural", upto(0, 9)),
    Spec("factorial", "returns the factorial of the non-negative integer {x}",
         "result = 1\nfor i in range(2, {x} + 1):\n    result *= i\nreturn result",
         "Multiply 1 by every number from 2 up to {x}.", lambda k, x: _factorial(x), "small"),
    Spec("is_prime", "returns True if {x} is a prime number and False otherwise",
         "if {x} < 2:\n    return False\nfor d in range(2, {x}):\n    if {x} % d == 0:\n        return False\n"
         "return True",
         "Numbers below 2 are not prime; otherwise any divisor from 2 to {x} - 1 means not prime.",
         lambda k, x: x > 1 and all(x % d for d in range(2, x)), "natural"),
    Spec("multiples_of_{w}", "returns the list of multiples of {k} from {k} up to {x}",
         "return list(range({k}, {x} + 1, {k}))", "range from {k} to {x} in steps of {k}.",
         lambda k, x: [v for v in range(1, x + 1) if v % k == 0], "natural", upto(2, 9)),
    Spec("sum_multiples_of_{w}", "returns the sum of the numbers from 1 to {x} that are divisible by {k}",
         "total = 0\nfor v in range(1, {x} + 1):\n    if v % {k} == 0:\n        total += v\nreturn total",
         "Loop v from 1 to {x} and add each v with v % {k} == 0 to a total.",
         lambda k, x: sum(v for v in range(1, x + 1) if v % k == 0), "natural", upto(2, 9)),
    Spec("fizzbuzz_{k[0]}_{k[1]}",
         'returns "FizzBuzz" if {x} is divisible by {k[0]} and {k[1]}, "Fizz" if only by {k[0]}, "Buzz" if only by '
         '{k[1]}, else str({x})',
         'if {x} % {k[0]} == 0 and {x} % {k[1]} == 0:\n    return "FizzBuzz"\nif {x} % {k[0]} == 0:\n'
         '    return "Fizz"\nif {x} % {k[1]} == 0:\n    return "Buzz"\nreturn str({x})',
         "Test both divisors first, then {k[0]}, then {k[1]}, else the number as a string.",
         lambda k, x: _fizzbuzz(*k, x), "natural", DIVISOR_PAIRS),
    Spec("longest_word", "returns the longest word in {x}, the first one if several are as long, or an empty string",
         'best = ""\nfor word in {x}.split():\n    if len(word) > len(best):\n        best = word\nreturn best',
         "Loop over the words and keep one only when it is longer than the best so far.",
         lambda k, x: max(x.split(), key=len, default=""), "text"),
    Spec("count_longer_than_{w}", "returns how many words in {x} have more than {k} letters",
         "count = 0\nfor word in {x}.split():\n    if len(word) > {k}:\n        count += 1\nreturn count",
         "Loop over the words of {x} and count those with len(word) > {k}.",
         lambda k, x: sum(len(word) > k for word in x.split()), "text", upto(2, 6)),
    Spec("count_starting_with_{k}", 'returns how many words in {x} start with the letter "{k}", in either case',
         'count = 0\nfor word in {x}.split():\n    if word.lower().startswith("{k}"):\n        count += 1\n'
         "return count",
         'Loop over the words of {x} and count those whose lowered form starts with "{k}".',
         lambda k, x: sum(word.lower().startswith(k) for word in x.split()), "text", LETTERS),
)



def _build(level: int, spec: Spec, k_index: int, name_index: int) -> Problem | None:
    argument = ARGUMENTS[spec.argument]
    if k_index >= len(spec.ks) or name_index >= len(argument.names):
        return None
    k = spec.ks[k_index]
    names = argument.names[name_index]
    fields = dict(zip("xy", names), k=k, w=NUMBER_WORDS[k] if isinstance(k, int) else k)
    name = spec.name.format(**fields)
    signature = f"{name}({', '.join(names)})"
    # No example call: the spec says it all, and an example would double a prompt for a small model.
    prompt = f"Write a Python function {signature} that {spec.does.format(**fields)}."
    body = "\n".join("    " + line for line in spec.body.format(**fields).splitlines())
    response = f"```python\ndef {signature}:\n{body}\n```"
    tests = [f"assert {name}({', '.join(map(repr, inputs))}) == {spec.solve(k, *inputs)!r}"
             for inputs in argument.inputs]
    # The key is the function, whatever its argument is called: a test function is one training never writes.
    return Problem("code", level, prompt, spec.plan.format(**fields), response, {"tests": tests}, key=name)


def _space(level: int, specs: tuple[Spec, ...]) -> Space:
    most_ks = max(len(spec.ks) for spec in specs)
    most_names = max(len(ARGUMENTS[spec.argument].names) for spec in specs)
    return Space((specs, range(most_ks), range(most_names)), lambda *choice: _build(level, *choice))


SPACES = {level: _space(level, specs) for level, specs in enumerate((LEVEL_1, LEVEL_2, LEVEL_3, LEVEL_4), 1)}

CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
MODULE_LINE = re.compile(r'File "solution\.py", line (\d+), in <module>')
HARNESS = """\
import os
import sys


def main():
    write = os.write  # the code may replace os.write; this reference stays the harness's
    nonce = sys.stdin.buffer.read()
    os.close(0)
    exec(compile(PROGRAM, "solution.py", "exec"), {"__name__": "__main__"})
    write(1, b"\\n" + nonce + b"\\n")


PROGRAM = %r
main()
"""
"""The program the sandbox runs: the nonce lives in main's frame, not in a module global the code could import."""
ERROR_CHARS = 160
"""The most of a failure's last stderr line that a reason keeps."""


def last_python_block(text: str) -> str | None:
    blocks = CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


class CodeTask(GeneratedTask):
    name = "code"
    spaces = SPACES

    def __init__(self, runner: Runner | None = None):
        self.runner = runner or Runner()

    def score(self, data: dict, completion: str) -> Score:
        start = time.perf_counter()
        tests = _tests(data)
        code = last_python_block(completion)
        if code is None:
            return Score(0.0, False, "no python code block", seconds=time.perf_counter() - start)
        nonce = secrets.token_hex(16)
        program, test_lines = _program(code, tests)
        try:
            run = self.runner.run(HARNESS % program, stdin=nonce.encode())
        except SandboxError as e:
            return Score(0.0, False, str(e), error=True, seconds=time.perf_counter() - start)
        passed = run.exit_code == 0 and not run.timed_out and nonce in run.stdout.splitlines()
        reason = "correct" if passed else self._failure(run, test_lines)
        return Score(float(passed), passed, reason, seconds=time.perf_counter() - start)

    def _failure(self, run: Execution, test_lines: list[tuple[int, int]]) -> str:
        if run.timed_out:
            return f"timed out after {self.runner.timeout:g} s"
        if run.truncated:
            return f"output passed {self.runner.output_bytes} bytes"
        if run.exit_code == 0:
            return "exited before the tests finished"
        if run.exit_code < 0:
            return f"killed by {signal.Signals(-run.exit_code).name}"
        error = next((line for line in reversed(run.stderr.splitlines()) if line.strip()), f"exit code {run.exit_code}")
        error = error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 3] + "..."
        # The outermost frame of the program in the last traceback is its own line that raised.
        frame = MODULE_LINE.search(run.stderr.rsplit("Traceback (most recent call last):", 1)[-1])
        line = int(frame.group(1)) if frame else 0
        failed = next((i for i, (first, last) in enumerate(test_lines, 1) if first <= line <= last), None)
        return f"test {failed} failed: {error}" if failed else error


def _program(code: str, tests: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The code, then the tests as top-level statements (the code cannot wrap them in a try), for the harness to
    run as solution.py; also the program lines (first, last) each test spans."""
    lines = code.rstrip("\n").split("\n") + ["", ""]
    spans = []
    for test in tests:
        spans.append((len(lines) + 1, len(lines) + 1 + test.count("\n")))
        lines.append(test)
    return "\n".join(lines) + "\n", spans


def _tests(data: dict) -> list[str]:
    tests = data.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(test, str) for test in tests):
        raise ValueError(f"code data needs 'tests': a non-empty list of Python statements, got {data!r}")
    for i, test in enumerate(tests, 1):
        try:
            compile(test, f"test {i}", "exec")
        except SyntaxError as e:
            raise ValueError(f"code test {i} is not valid Python ({e.msg}): {test!r}") from e
    return tests
