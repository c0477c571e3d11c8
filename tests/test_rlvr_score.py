"""`n3 rlvr score`: a table and a summary line, or a JSON line per row, for rows of each domain and of a user class;
bad input exits 2 with one line (in-process through n3cli.main.main, and once through the installed script)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from n3cli.main import app, main

N3 = Path(sys.executable).parent / "n3"
ADD_TWO = "```python\ndef add_two(x):\n    return x + {}\n```"


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def score(*args: str):
    result = CliRunner().invoke(app, ["rlvr", "score", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_table_and_a_summary(tmp_path):
    rows = write_rows(tmp_path / "math.jsonl", [
        {"prompt": "Half of one?", "answer": "\\frac{1}{2}", "completion": "So \\boxed{0.5}."},
        {"answer": 85, "completion": "The answer is 85."},
        {"answer": 85, "completion": "\\boxed{84}"},
    ])
    output = score("--env", "math", "--input", str(rows))
    cells = [[cell.strip() for cell in line.split("│")] for line in output.splitlines()[2:5]]
    assert [row[:4] for row in cells] == [["1", "1.000", "pass", "correct"], ["2", "0.000", "fail", "no \\boxed{} answer"],
                                          ["3", "0.000", "fail", "wrong answer 84 (expected 85)"]]
    assert output.splitlines()[-1] == "3 rows, mean reward 0.333, passed 1, errors 0"


def test_json_lines_for_code_and_instructions(tmp_path):
    code = write_rows(tmp_path / "code.jsonl", [
        {"tests": ["assert add_two(1) == 3"], "completion": ADD_TWO.format(2)},
        {"tests": ["assert add_two(1) == 3"], "completion": ADD_TWO.format(1)},
    ])
    results = [json.loads(line) for line in score("--env", "code", "--input", str(code), "--json").splitlines()]
    assert [list(r) for r in results] == [["row", "reward", "passed", "reason", "error", "seconds"]] * 2
    assert [(r["row"], r["passed"], r["reason"]) for r in results] == [
        (1, True, "correct"), (2, False, "test 1 failed: AssertionError")]
    instructions = write_rows(tmp_path / "rules.jsonl", [
        {"instructions": [{"id": "case:lower"}, {"id": "punctuation:no_comma"}], "completion": "red, blue"}])
    (result,) = [json.loads(line) for line in score("-e", "instructions", "-i", str(instructions), "--json").splitlines()]
    assert (result["reward"], result["reason"]) == (0.5, "1 of 2 followed, not punctuation:no_comma")


def test_a_user_class_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "yes_env.py").write_text(
        "from stages.envs import Score\n"
        "class Yes:\n    name = 'yes'\n    def prompts(self, split, count, seed): return []\n"
        "    def score(self, data, completion):\n"
        "        ok = completion.lower() == data['want']\n"
        "        return Score(float(ok), ok, 'correct' if ok else 'not ' + data['want'])\n")
    rows = write_rows(tmp_path / "rows.jsonl", [{"want": "yes", "completion": "Yes"},
                                                {"want": "yes", "completion": "no"}, {"completion": "yes"}])
    results = [json.loads(line) for line in score("--env", "yes_env:Yes", "--input", str(rows), "--json").splitlines()]
    assert [(r["reward"], r["reason"], r["error"]) for r in results] == [
        (1.0, "correct", False), (0.0, "not yes", False), (0.0, "checker failed: KeyError: 'want'", True)]
    summary = score("--env", "yes_env:Yes", "--input", str(rows)).splitlines()[-1]
    assert summary.startswith("3 rows, mean reward 0.500, passed 1, errors 1 (left out of the mean")


def one_line_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main(["rlvr", "score", *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.removeprefix("error: ").strip()


@pytest.mark.parametrize("env, lines, message", [
    ("maths", ['{"answer": 1, "completion": "x"}'], "unknown environment 'maths'"),
    ("math", ['{"answer": 1, "completion": "x"}', '{"completion": "x"}'],
     "rows.jsonl:2: a math row needs 'answer'; this one has no 'answer'"),
    ("math", ['{"answer": 1}'], "rows.jsonl:1: a row to score needs 'completion'; this one has no 'completion'"),
    ("math", ['{"answer": 1, "completion": "x"}', '{"answer": 1, "completion": }'], "rows.jsonl:2: not valid JSON"),
    ("code", ['{"tests": ["assert f() == 1"], "completion": 3}'], "rows.jsonl:1: 'completion' is a string, got int"),
    ("not_a_module_here:Env", ['{"completion": "x"}'],
     "environment not_a_module_here:Env: cannot import not_a_module_here (ModuleNotFoundError"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, env, lines, message):
    monkeypatch.delenv("N3_DEBUG", raising=False)
    rows = write_rows(tmp_path / "rows.jsonl", lines)
    assert message in one_line_error(capsys, "--env", env, "--input", str(rows))


def test_a_sandbox_without_namespaces_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    from stages.envs import sandbox

    monkeypatch.delenv("N3_DEBUG", raising=False)
    monkeypatch.setattr(sandbox, "namespace_failure", lambda: "unshare: permission denied")
    rows = write_rows(tmp_path / "code.jsonl", [{"tests": ["assert add_two(1) == 3"], "completion": ADD_TWO.format(2)}])
    message = one_line_error(capsys, "--env", "code", "--input", str(rows))
    assert message.startswith("the code sandbox cannot use Linux namespaces here (unshare: permission denied)")
    (result,) = score("--env", "code", "--input", str(rows), "--json", "--allow-weak-isolation").splitlines()
    assert json.loads(result)["passed"]


def test_a_bad_class_is_one_line_from_the_installed_command(tmp_path):
    (tmp_path / "half_env.py").write_text("class Half:\n    name = 'half'\n    def prompts(self, s, c, seed): return []\n")
    write_rows(tmp_path / "rows.jsonl", [{"completion": "x"}])
    environ = {k: v for k, v in __import__("os").environ.items() if k != "N3_DEBUG"}
    result = subprocess.run([str(N3), "rlvr", "score", "--env", "half_env:Half", "--input", "rows.jsonl"],
                            capture_output=True, text=True, cwd=tmp_path, env=environ)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("error: environment half_env:Half: Half does not implement the Environment interface "
                             "(stages/envs/environments.py): it lacks a score() method\n")
