"""Environments (stages.envs.environments): built-in ones keep test prompts out of training, file rows of each domain
are read, split and scored, user classes are held to the interface, blends follow their weights, bad input names
the file and line; and math scores as math-verify judges, from any thread, without stalling on a runaway answer."""

import json
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import stages.envs.math as math_env
from model.errors import UserError
from stages.envs import TASKS, Prompt, blend_prompts, load_environment, load_environments, split_of
from stages.envs.environments import weights_by_name
from stages.envs.sandbox import Runner

ADD_TWO = "```python\ndef add_two(x):\n    return x + {}\n```"


def write_rows(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A folder to write environment modules in, as the current directory; sys.path is restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


# --- built-in ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, levels", [("math:1-2", [1, 2]), ("code", None), ("instructions:3", [3])])
def test_builtin_environments_keep_test_prompts_out_of_training(spec, levels):
    env = load_environment(spec)
    assert (env.name, env.levels) == (spec.split(":")[0], levels)
    train, test = env.prompts("train", 200, seed=0), env.prompts("test", 50, seed=0)
    assert len(train) == 200 and test and not {p.key for p in train} & {p.key for p in test}
    assert all(split_of(p.key) == "test" for p in test)
    assert env.prompts("train", 200, seed=0) == train
    assert all(p.env == env.name and [m["role"] for m in p.messages] == ["user"] for p in train + test)


# --- files ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain, row, right, wrong", [
    ("math", {"prompt": "Half of one?", "answer": "\\frac{1}{2}", "system": "Box the answer."},
     "It is \\boxed{0.5}.", "It is 0.5."),  # unboxed: 0, whatever it says
    ("code", {"prompt": "Write add_two(x).", "tests": ["assert add_two(1) == 3", "assert add_two(-2) == 0"]},
     ADD_TWO.format(2), ADD_TWO.format(1)),
    ("instructions", {"prompt": "Name a color, shouting.", "instructions": [{"id": "case:upper"},
                                                                            {"id": "words:at_most", "kwargs": {"n": 2}}]},
     "RED!", "Red, I think."),
])
def test_file_environments_score_their_rows(tmp_path, domain, row, right, wrong):
    env = load_environment(f"{domain}=" + write_rows(tmp_path / "rows.jsonl", [row]), hold_out=False)
    (prompt,) = env.prompts("train", 1, seed=0)
    assert prompt.messages[-1] == {"role": "user", "content": row["prompt"]} and prompt.env == domain
    assert ("system" in row) == (prompt.messages[0]["role"] == "system")
    assert env.score(prompt.data, right).passed
    score = env.score(prompt.data, wrong)
    assert not score.passed and not score.error and score.reward < 1


def test_code_runs_through_the_runner_given(tmp_path):
    runner = Runner(concurrent=1, isolation="process")
    path = write_rows(tmp_path / "code.jsonl", [{"prompt": "p", "tests": ["assert True"]}])
    assert load_environment("code:1", runner=runner).task.runner is runner
    assert load_environment(f"code={path}", runner=runner).task.runner is runner
    assert load_environment("math", runner=runner).task is TASKS["math"]


def test_file_rows_are_held_out_by_their_prompt(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(40)]
    path = write_rows(tmp_path / "sums.jsonl", rows)
    env = load_environment(f"math={path}")
    train, test = env.prompts("train", 100, seed=0), env.prompts("test", 100, seed=0)
    assert {p.key for p in test} == {r["prompt"] for r in rows if split_of(r["prompt"]) == "test"} != set()
    assert {p.key for p in train} == {r["prompt"] for r in rows} - {p.key for p in test}
    assert len(train) == 100 and len(test) < 40  # train repeats, test gives what it has
    assert env.prompts("train", 100, seed=1) != train
    everything = load_environment(f"math={path}", hold_out=False)
    assert len({p.key for p in everything.prompts("train", 100, 0)}) == 40 and everything.prompts("test", 9, 0) == []


@pytest.mark.parametrize("spec, lines, message", [
    ("math", ['{"prompt": "a", "answer": 1}', '{"prompt": "b"}'],
     "rows.jsonl:2: a math row needs 'prompt' and 'answer'; this one has no 'answer'"),
    ("math", ['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": 2'], "rows.jsonl:2: not valid JSON"),
    ("math", ['{"prompt": "a", "answer": ""}'], "rows.jsonl:1: math data needs a non-empty 'answer'"),
    ("math", ['{"prompt": 7, "answer": 1}'], "rows.jsonl:1: 'prompt' is a non-empty string, got 7"),
    ("math", ['["a", 1]'], "rows.jsonl:1: a row is a JSON object, got list"),
    ("code", ['{"prompt": "a", "tests": ["assert f(1) =="]}'], "rows.jsonl:1: code test 1 is not valid Python"),
    ("code", ['{"prompt": "a", "tests": "assert f(1)"}'], "rows.jsonl:1: code data needs 'tests'"),
    ("instructions", ['{"prompt": "a", "instructions": [{"id": "case:shout"}]}'],
     "rows.jsonl:1: unknown instruction {'id': 'case:shout'}"),
    ("instructions", ['{"prompt": "a", "instructions": [{"id": "words:at_most", "kwargs": {"n": "2"}}]}'],
     "rows.jsonl:1: instruction words:at_most takes kwargs (n: int)"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, spec, lines, message):
    path = write_rows(tmp_path / "rows.jsonl", lines)
    with pytest.raises(UserError, match="^" + re.escape(str(tmp_path / message))):
        load_environment(f"{spec}={path}")


def test_bad_specs_say_what_is_wrong(tmp_path):
    for spec, message in [("maths", "unknown environment 'maths'"), ("math:9", "math has levels 1, 2, 3, 4, 5"),
                          ("judge=rows.jsonl", "DOMAIN=FILE scores the rows with a domain's checker"),
                          (f"math={tmp_path / 'none.jsonl'}", "none.jsonl is not a file")]:
        with pytest.raises(UserError, match=re.escape(message)):
            load_environment(spec)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no rows"):
        load_environment(f"math={tmp_path / 'empty.jsonl'}")


# --- classes ----------------------------------------------------------------------------------------------------

JUDGE = '''
from stages.envs import Prompt, Score

class Judge:
    name = "judge"

    def prompts(self, split, count, seed):
        return [Prompt("judge", [{"role": "user", "content": f"Say {split} {i}."}], {"want": f"{split} {i}"},
                       f"{split} {i}") for i in range(count)]

    def score(self, data, completion):
        ok = completion == data["want"]
        return Score(float(ok), ok, "correct" if ok else "wrong")
'''


def test_a_class_that_implements_the_interface_is_an_environment(user_modules):
    (user_modules / "judge_env.py").write_text(JUDGE)
    env = load_environment("judge_env:Judge")
    (prompt,) = env.prompts("train", 1, seed=0)
    assert env.name == "judge" and prompt.messages == [{"role": "user", "content": "Say train 0."}]
    assert env.score(prompt.data, "train 0").passed and not env.score(prompt.data, "no").passed
    crashed = env.score({}, "train 0")  # its score() raises: a checker failure, dropped rather than scored 0
    assert crashed.error and crashed.reason == "checker failed: KeyError: 'want'"


@pytest.mark.parametrize("source, message", [
    pytest.param("class Env:\n    name = 'x'\n    def prompts(self, s, c, seed): return []\n",
                 "environment {module}:Env: Env does not implement the Environment interface "
                 "(stages/envs/environments.py): it lacks a score() method", id="no_score"),
    pytest.param("class Env:\n    def prompts(self, s, c, seed): return []\n    score = None\n",
                 "it lacks a name (a non-empty str) and a score() method", id="no_name"),
    pytest.param("class Other:\n    pass\n", "environment {module}:Env: {module} has no class Env", id="no_class"),
    pytest.param("class Env:\n    def __init__(self, size): pass\n", "Env() failed (TypeError", id="arguments"),
    pytest.param("import no_such_module_anywhere\n",
                 "cannot import {module} (ModuleNotFoundError: No module named 'no_such_module_anywhere')",
                 id="import_fails"),
    pytest.param("class Env(\n", "cannot import {module} (SyntaxError", id="syntax"),
])
def test_a_class_that_does_not_is_refused(user_modules, request, source, message):
    module = f"bad_env_{request.node.callspec.id}"  # a fresh module per case: imports are cached
    (user_modules / f"{module}.py").write_text(source)
    with pytest.raises(UserError, match=re.escape(message.format(module=module))):
        load_environment(f"{module}:Env")


def test_a_class_is_held_to_what_it_returns(user_modules):
    (user_modules / "sloppy_env.py").write_text(
        "from stages.envs import Prompt\n"
        "class Sloppy:\n    name = 'sloppy'\n"
        "    def prompts(self, split, count, seed): return [Prompt('other', [], {}, 'k')]\n"
        "    def score(self, data, completion): return 1.0\n")
    env = load_environment("sloppy_env:Sloppy")
    with pytest.raises(UserError, match="prompts\\(\\) returns Prompts whose env is 'sloppy'"):
        env.prompts("train", 1, 0)
    with pytest.raises(UserError, match="score\\(\\) returns a Score with a reward in \\[0, 1\\]; got 1.0"):
        env.score({}, "x")


# --- blends -----------------------------------------------------------------------------------------------------

def test_blends_follow_their_weights(user_modules):
    (user_modules / "judge_env.py").write_text(JUDGE)
    envs = load_environments(["math:1", "instructions", "judge_env:Judge"], [2, 1, 1])
    assert list(envs) == ["math", "instructions", "judge"]
    prompts = blend_prompts(envs, [2, 1, 1], 40, "train", seed=0)
    assert Counter(p.env for p in prompts) == {"math": 20, "instructions": 10, "judge": 10}
    assert all(isinstance(p, Prompt) for p in prompts) and len({p.env for p in prompts[:8]}) > 1  # interleaved
    assert blend_prompts(envs, [2, 1, 1], 40, "train", seed=0) == prompts
    assert blend_prompts(envs, [2, 1, 1], 40, "train", seed=1) != prompts
    assert sorted(Counter(p.env for p in blend_prompts(envs, [], 10, "train", 0)).values()) == [3, 3, 4]
    assert weights_by_name(envs, {"judge": 3.0}) == [1.0, 1.0, 3.0]


def test_bad_blends_are_refused(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"prompt": "a", "answer": 1}])
    for specs, weights, message in [
        (["math", f"math={path}"], [], "another environment is named 'math' too"),
        (["math", "code"], [1], "1 weights for 2 environments (math, code)"),
        (["math", "code"], [1, 0], "environment weights must be positive"),
        ([], [], "no environments given"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            load_environments(specs, weights)
    with pytest.raises(UserError, match="--weight maths: no environment is named 'maths' \\(math, code\\)"):
        weights_by_name(load_environments(["math", "code"]), {"maths": 2.0})


# --- math -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, answer", [("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.25"),
                                          ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2 + 1", "1 + x^2"), ("85", "85.0")])
def test_math_answers_score_as_math_verify_judges(gold, answer):
    from math_verify import parse, verify

    judged = verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer}}}"))
    assert TASKS["math"].score({"answer": gold}, f"So \\boxed{{{answer}}}.").passed == judged
    assert TASKS["math"].score({"answer": gold}, f"So {answer}.").reason == "no \\boxed{} answer"


def test_math_scores_from_worker_threads():
    completions = [f"\\boxed{{{n}}}" for n in (12, 13, "\\frac{24}{2}", 12.0)]
    with ThreadPoolExecutor(3) as pool:
        scores = list(pool.map(lambda c: TASKS["math"].score({"answer": 12}, c), completions))
    assert [s.passed for s in scores] == [True, False, True, True] and not any(s.error for s in scores)


def test_a_runaway_math_check_is_cut_off(monkeypatch):
    """sympy would work on 9^(9^9) for good, holding the GIL: its checker process is killed after STALL seconds,
    the answer scores 0 (not an error), and the next check gets a fresh process."""
    monkeypatch.setattr(math_env, "STALL", 0.3)
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        score = pool.submit(TASKS["math"].score, {"answer": "85"}, "\\boxed{9^{9^{9}}}").result()
    assert (score.reward, score.error, score.reason) == (0.0, False, "checking 9^{9^{9}} took over 0.3 s")
    assert time.perf_counter() - start < 3
    monkeypatch.setattr(math_env, "STALL", 20)
    assert TASKS["math"].score({"answer": "85"}, "\\boxed{85}").passed


def test_a_bare_domain_takes_the_levels_the_preset_gives_it():
    from stages.envs.environments import with_preset_levels

    preset = ["math:1-2", "code:3-4", "instructions"]
    assert with_preset_levels(["math", "code:1", "instructions", "math=rows.jsonl"], preset) == [
        "math:1-2", "code:1", "instructions", "math=rows.jsonl"]
