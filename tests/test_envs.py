"""The built-in verifiable tasks (stages.envs): determinism, disjoint splits, reference answers that score 1.0 (the
code ones executed) and each checker's edge cases; the program runner has tests/test_sandbox.py."""

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from stages.envs import TASKS, split_of
from stages.envs.code import SPACES as CODE_SPACES
from stages.envs.code import CodeTask
from stages.envs.instructions import BANK_SIZE, KINDS, REQUESTS, check
from stages.envs.math import last_boxed, steps
from stages.envs.sandbox import Runner

ADD_THREE = {"tests": ["assert add_three(1) == 4", "assert add_three(-3) == 0"]}


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def code_task():
    return CodeTask(Runner(concurrent=2, timeout=5.0))


# --- every domain ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_problems_are_deterministic(name):
    task = TASKS[name]
    problems = task.problems("train", 12, seed=3)
    assert problems == task.problems("train", 12, seed=3)
    assert problems[:5] == task.problems("train", 5, seed=3)  # asking for more extends the list
    assert problems != task.problems("train", 12, seed=4)
    assert [p.level for p in problems[: len(task.levels)]] == list(task.levels)  # levels taken in turn
    assert all(p.domain == name for p in problems)


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_at_every_level(name):
    task = TASKS[name]
    for level in task.levels:
        train = [p for seed in (0, 1) for p in task.problems("train", 80, seed, [level])]
        test = task.problems("test", 80, 0, [level])
        assert train and test and {p.level for p in train + test} == {level}
        assert not {p.key for p in train} & {p.key for p in test}
        assert {split_of(p.key) for p in train} == {"train"} and {split_of(p.key) for p in test} == {"test"}


def test_split_of_is_stable_and_holds_out_a_fifth():
    # Pinned: a change to the hash would move problems between the splits of data sets already built.
    keys = ("What is 3 + 4?", "What is 2 - 1?", "What is 3 + 9?", "Name some colors. Use exactly 4 words.")
    assert [split_of(key) for key in keys] == ["train", "test", "test", "train"]
    share = sum(split_of(f"key {i}") == "test" for i in range(20_000)) / 20_000
    assert 0.19 < share < 0.21


def test_keys_are_distinct_until_the_space_runs_out():
    task = TASKS["math"]  # level 1 holds 155 problems
    test = task.problems("test", 500, 0, [1])
    assert 10 < len(test) < 60 and len({p.key for p in test}) == len(test)  # the whole test split, once
    train = task.problems("train", 500, 0, [1])
    distinct = len({p.key for p in train})
    assert len(train) == 500 and len(test) + distinct == 155
    assert len({p.key for p in train[:distinct]}) == distinct  # every train problem once before any repeats


def test_bad_split_or_level_is_refused():
    with pytest.raises(ValueError, match="split"):
        TASKS["math"].problems("validation", 1, 0)
    with pytest.raises(ValueError, match="levels 1, 2, 3, 4, 5"):
        TASKS["math"].problems("train", 1, 0, [9])


def test_messages_carry_reasoning_unless_asked_not_to():
    problem = TASKS["math"].problems("train", 1, 0)[0]
    user, assistant = problem.messages()
    assert user == {"role": "user", "content": problem.prompt}
    assert assistant == {"role": "assistant", "reasoning_content": problem.reasoning, "content": problem.response}
    assert problem.messages(reasoning=False)[1] == {"role": "assistant", "content": problem.response}


@pytest.mark.parametrize("name", ["math", "instructions"])
def test_references_score_full_marks(name):
    task = TASKS[name]
    for level in task.levels:
        for problem in task.problems("train", 60, 0, [level]) + task.problems("test", 20, 0, [level]):
            score = task.score(problem.data, problem.response)
            assert (score.reward, score.passed, score.reason, score.error) == (1.0, True, "correct", False), problem


def test_code_references_pass_when_run(code_task):
    """Every spec's reference (first parameter and argument names), plus a sample from both splits, executed."""
    problems = [space.build(spec, 0, 0) for space in CODE_SPACES.values() for spec in space.choices[0]]
    problems += code_task.problems("train", 16, 0) + code_task.problems("test", 8, 0)
    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda p: code_task.score(p.data, p.response), problems))
    failed = [(p.prompt, s.reason) for p, s in zip(problems, scores) if not (s.passed and s.reward == 1.0)]
    assert not failed


# --- math -------------------------------------------------------------------------------------------------------

def test_math_prompts_of_the_first_levels_are_plain_expressions():
    pattern = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
    for problem in TASKS["math"].problems("train", 60, 0, [1, 2, 3]):
        a, op, b = pattern.fullmatch(problem.prompt).groups()
        assert problem.data["answer"] == str(eval(f"{a} {op} {b}"))


def test_math_reasoning_ends_with_the_answer():
    for problem in TASKS["math"].problems("train", 100, 0):
        assert problem.reasoning.endswith(f"= {problem.data['answer']}."), problem
        assert problem.response == f"The answer is \\boxed{{{problem.data['answer']}}}."


def test_math_steps():
    assert steps(3, "+", 4) == "3 + 4 = 4 + 3 = 5 + 2 = 6 + 1 = 7 + 0 = 7."
    assert steps(7, "-", 3) == "7 - 3 = 6 - 2 = 5 - 1 = 4 - 0 = 4."
    assert steps(47, "+", 38) == "Ones: 7 + 8 = 15, write 5, carry 1. Tens: 4 + 3 + 1 = 8. So 47 + 38 = 85."
    assert steps(83, "-", 27) == "Ones: 13 - 7 = 6, borrow 1. Tens: 8 - 2 - 1 = 5. So 83 - 27 = 56."
    assert steps(7, "*", 46) == ("7 * 46 = 46 * 7. Ones: 6 * 7 = 42, write 2, carry 4. "
                                 "Tens: 4 * 7 = 28, 28 + 4 = 32. So 7 * 46 = 322.")


@pytest.mark.parametrize("completion, reward, reason", [
    ("The answer is \\boxed{85}.", 1.0, "correct"),
    ("The answer is 85.", 0.0, "no \\boxed{} answer"),  # never a fall back to the whole text
    ("\\boxed{85", 0.0, "no \\boxed{} answer"),  # cut off
    ("First \\boxed{84}, no: \\boxed{85}", 1.0, "correct"),  # the last boxed answer wins
    ("First \\boxed{85}, no: \\boxed{84}", 0.0, "wrong answer 84 (expected 85)"),
    ("\\boxed{085}", 1.0, "correct"),  # equal values are equal answers (math-verify)
    ("\\boxed{85.0}", 1.0, "correct"),
    ("\\boxed{\\frac{170}{2}}", 1.0, "correct"),
    ("\\boxed{-85}", 0.0, "wrong answer -85 (expected 85)"),
    ("\\boxed{850}", 0.0, "wrong answer 850 (expected 85)"),
])
def test_math_scoring(completion, reward, reason):
    score = TASKS["math"].score({"answer": "85"}, completion)
    assert (score.reward, score.passed, score.reason, score.error) == (reward, reward == 1.0, reason, False)


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("nothing here") is None


def test_math_data_is_checked():
    assert TASKS["math"].score({"answer": 85}, "\\boxed{85}").passed
    with pytest.raises(ValueError, match="answer"):
        TASKS["math"].score({}, "\\boxed{85}")


def test_math_scores_off_the_main_thread():
    scores = []
    worker = threading.Thread(target=lambda: scores.append(TASKS["math"].score({"answer": "12"}, "\\boxed{12}")))
    worker.start()
    worker.join()
    assert scores[0].passed and not scores[0].error


# --- code -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [
    ("def add_three(x):\n    return x + 2", "test 1 failed: AssertionError"),
    ("def add_three(x):\n    return 4 if x == 1 else 1", "test 2 failed: AssertionError"),
    ("def add_three(x):\n    return y", "test 1 failed: NameError: name 'y' is not defined"),
    ("def add_three(x) return x", "SyntaxError: expected ':'"),
    ("import sys\ndef add_three(x):\n    return x\nsys.exit(0)", "exited before the tests finished"),
    ("import os\ndef add_three(x):\n    return x\nos._exit(0)", "exited before the tests finished"),
    ("import os, sys\nsys.excepthook = lambda *e: os._exit(0)\ndef add_three(x):\n    return x",
     "exited before the tests finished"),  # a swallowed failure
])
def test_code_failures(code_task, code, reason):
    score = code_task.score(ADD_THREE, fenced(code))
    assert (score.reward, score.passed, score.reason, score.error) == (0.0, False, reason, False)


def test_code_takes_the_last_block(code_task):
    completion = fenced("def add_three(x):\n    return 0") + fenced("def add_three(x):\n    return x + 3")
    assert code_task.score(ADD_THREE, completion).passed
    assert code_task.score(ADD_THREE, "def add_three(x):\n    return x + 3").reason == "no python code block"


def test_code_timeout():
    score = CodeTask(Runner(timeout=0.5)).score(ADD_THREE, fenced("while True:\n    pass"))
    assert (score.passed, score.reason, score.error) == (False, "timed out after 0.5 s", False)
    assert score.seconds < 3


def test_code_data_is_checked(code_task):
    with pytest.raises(ValueError, match="tests"):
        code_task.score({}, fenced("pass"))
    with pytest.raises(ValueError, match="test 1 is not valid Python"):
        code_task.score({"tests": ["assert ("]}, fenced("pass"))


# --- instructions -----------------------------------------------------------------------------------------------

CHECKS = [  # id, kwargs, followed, not followed
    ("case:upper", {}, "RED, BLUE.", "Red, blue."),
    ("case:lower", {}, "red, blue.", "Red, blue."),
    ("punctuation:no_comma", {}, "Red blue.", "Red, blue."),
    ("start:first_word", {"word": "green"}, "- Green\n- red", "Red, green."),
    ("end:last_word", {"word": "green"}, '"Red, GREEN."', "Green, red."),
    ("keyword:include", {"word": "lion"}, "A Lion sleeps.", "A lioness sleeps."),
    ("keyword:exclude", {"word": "lion"}, "A lioness sleeps.", "The lion sleeps."),
    ("words:at_most", {"n": 3}, "one two three", "one, two, three, four"),
    ("words:at_least", {"n": 3}, "don't stop me now", "one two"),
    ("words:exactly", {"n": 3}, "- one\n- two\n- three", "one two"),
    ("format:bullets", {"n": 2}, "Two:\n- red\n- blue", "* red\n* blue"),
    ("format:json_key", {"key": "answer"}, ' {"answer": "red"}\n', 'Sure: {"answer": "red"}'),
    ("format:quoted", {}, '"Red, blue."', "Red, blue."),
]


def test_every_instruction_kind_is_checked():
    assert sorted(id_ for id_, *_ in CHECKS) == sorted(KINDS)


@pytest.mark.parametrize("id_, kwargs, good, bad", CHECKS)
def test_instruction_checks(id_, kwargs, good, bad):
    assert check({"id": id_, "kwargs": kwargs}, good)
    assert not check({"id": id_, "kwargs": kwargs}, bad)


def test_instruction_checks_edges():
    assert not check({"id": "case:upper", "kwargs": {}}, "123")  # no letters: not "all capitals"
    assert not check({"id": "format:json_key", "kwargs": {"key": "answer"}}, '["answer"]')
    assert not check({"id": "format:json_key", "kwargs": {"key": "answer"}}, "[" * 100_000)
    assert not check({"id": "format:bullets", "kwargs": {"n": 2}}, "- a\n- b\n- c")


def test_bad_instructions_raise_naming_the_id():
    with pytest.raises(ValueError, match="case:title"):
        check({"id": "case:title", "kwargs": {}}, "text")
    for kwargs in ({}, {"n": "3"}, {"n": True}, {"n": 3, "m": 1}):
        with pytest.raises(ValueError, match="words:at_most"):
            check({"id": "words:at_most", "kwargs": kwargs}, "text")


def test_instructions_reward_is_the_fraction_followed():
    data = {"instructions": [{"id": "case:upper", "kwargs": {}}, {"id": "words:at_most", "kwargs": {"n": 2}},
                             {"id": "punctuation:no_comma", "kwargs": {}}]}
    score = TASKS["instructions"].score(data, "RED, BLUE")
    assert (score.reward, score.passed) == (2 / 3, False)
    assert score.reason == "2 of 3 followed, not punctuation:no_comma"
    with pytest.raises(ValueError, match="instructions"):
        TASKS["instructions"].score({"instructions": []}, "text")


def test_instruction_banks_are_full():
    assert all(len(set(request.bank)) == BANK_SIZE for request in REQUESTS)
