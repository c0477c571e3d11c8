"""`n3 recipe`: the built-in recipes load and chain each stage's output into the next as the commands a user types;
bad recipe files and flags are one-line errors; steps already finished are skipped, cut-off ones resumed, failures
reported; the report reads what the stages wrote; and a small recipe runs end to end through the real commands."""

import json
import shutil
from pathlib import Path

import pytest

from model.errors import UserError
from n3cli.main import main
from n3cli.recipe.book import command_of, load_recipe
from n3cli.recipe.report import figures, write_report
from n3cli.recipe.runner import StepFailed, read_state, run_steps, step_seconds
from n3cli.recipe.steps import plan_steps, select
from stages.envs.suite import DomainAccuracy, SuiteAccuracy
from tests.test_extend import FAST as EXTEND_FAST
from tests.test_pretrain import FAST as PRETRAIN_FAST
from tests.test_pretrain import n3_process


def start_of(step) -> str:
    return step.argv[step.argv.index("--checkpoint") + 1]


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_the_tiny_recipe_chains_every_stage_into_the_next():
    steps = plan_steps(load_recipe("tiny"), Path("r"))
    by = {s.name: s for s in steps}
    assert list(by) == ["data", "pretrain", "extend", "sft", "rlvr-math-1", "rlvr-code-1", "rlvr-instructions-1",
                        "mopd-1", "rlvr-math-2", "rlvr-code-2", "rlvr-instructions-2", "mopd-2", "mtp-boost",
                        "quantize", "eval-tasks", "eval-tasks-unquantized", "eval-ruler", "eval-perplexity",
                        "eval-mtp"]
    assert "--set" in by["pretrain"].argv and "data.path=r/corpus" in by["pretrain"].argv
    chain = {"extend": "r/pretrain", "sft": "r/extend", "rlvr-code-1": "r/sft", "mopd-1": "r/sft",
             "rlvr-code-2": "r/mopd-1", "mopd-2": "r/mopd-1", "mtp-boost": "r/mopd-2", "quantize": "r/mtp-boost",
             "eval-ruler": "r/quantized", "eval-tasks-unquantized": "r/mtp-boost"}
    assert {name: start_of(by[name]) for name in chain} == chain
    assert "code=r/rlvr-code-2" in by["mopd-2"].argv and "code=r/rlvr-code-1" in by["mopd-1"].argv
    assert by["rlvr-math-1"].argv[by["rlvr-math-1"].argv.index("--env") + 1] == "math"
    code_only = "rlvr.prompts_per_step=32"  # the code teacher's own set
    assert code_only in by["rlvr-code-2"].sets and code_only not in by["rlvr-math-2"].sets
    assert by["eval-perplexity"].argv[-4:-2] == ["--data", "r/corpus"]
    assert len(plan_steps(load_recipe("tiny"), Path("r"), cycles=1)) == len(steps) - 4  # three teachers, one mopd


@pytest.mark.parametrize("name", ["tiny", "ultra"])
def test_every_step_is_a_command_that_parses(name):
    """A step is what a user would type: its command line parses as that command's."""
    steps = plan_steps(load_recipe(name), Path("r"))
    for step in steps:
        words = step.argv[1:3] if step.stage == "eval" else step.argv[1:2]
        command_of(tuple(words)).make_context(" ".join(words), step.argv[1 + len(words):])
    if name == "ultra":
        assert all(step.argv[step.argv.index("--preset") + 1] == "gb200" for step in steps)


def test_from_and_until_take_stages_and_steps():
    steps = plan_steps(load_recipe("tiny"), Path("r"))
    assert [s.name for s in select(steps, "sft", "rlvr")][-1] == "rlvr-instructions-2"  # rlvr's last step
    assert [s.name for s in select(steps, "mopd-2", "mtp-boost")] == ["mopd-2", "mtp-boost"]
    assert [s.name for s in select(steps, None, "pretrain")] == ["data", "pretrain"]
    with pytest.raises(UserError, match="not a stage"):
        select(steps, "sfft", None)


def run_n3(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.err.strip()


@pytest.mark.parametrize("text, message", [
    ("cylces = 2\n[pretrain]\n", "unknown key 'cylces'.*did you mean 'cycles'"),
    ("[pretrain]\n[extend]\nseq_lne = 4096\n", "unknown key 'extend.seq_lne'.*did you mean 'extend.seq_len'"),
    ("[sftt]\n", "unknown key 'sftt'.*did you mean 'sft'"),
    ("[extend]\nseq_len = \"long\"\n", r"\[extend\].*valid integer"),
    ("[pretrain]\nset = [\"train.stpes=3\"]\n", r"\[pretrain\].*'train.stpes'.*did you mean 'train.steps'"),
    ("[sft]\ncheckpoint = \"x\"\n", "sft.checkpoint is set by the recipe itself"),
    ("[mopd]\n", r"\[mopd\] needs teachers"),
    ("[eval.ruler]\nlenghts = \"1k\"\n", "unknown key 'eval.ruler.lenghts'.*'eval.ruler.lengths'"),
    ("cycles = 0\n[sft]\n", "cycles must be at least 1"),
    ("[rlvr]\ndomains = [\"math\"]\n[rlvr.math]\nsett = []\n", "unknown key 'rlvr.math.sett'.*'rlvr.math.set'"),
    ("[rlvr]\n[rlvr.code]\nset = [\"rlvr.group_sise=4\"]\n", r"\[rlvr.code\].*'rlvr.group_sise'"),
    ("[pretrain\n", "not valid TOML"),
])
def test_a_bad_recipe_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    status, err = run_n3(capsys, "recipe", "--recipe", str(write_recipe(tmp_path, text)), "--dry-run")
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert pytest.importorskip("re").search(message, err), err


def test_bad_flags_say_what_to_do(tmp_path, capsys):
    root = tmp_path / "root"
    status, err = run_n3(capsys, "recipe", "--until", "sftt", "--out", str(root))
    assert status == 2 and "not a stage" in err
    status, err = run_n3(capsys, "recipe", "--from", "sft", "--out", str(root))
    assert status == 2 and "sft needs" in err and "`n3 recipe --until extend` makes it" in err, err
    assert not root.exists()  # nothing written


def test_a_missing_package_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    import n3cli.recipe.runner as runner

    monkeypatch.setitem(runner.NEEDS, "quantize", ("n3_no_such_module", "quantize"))
    root = tmp_path / "root"
    status, err = run_n3(capsys, "recipe", "--recipe", str(write_recipe(tmp_path, SMALL)), "--out", str(root))
    assert status == 2 and "step quantize needs n3_no_such_module" in err and "pip install 'n3[recipe]'" in err
    assert not root.exists()


def fake_launch(summaries: dict[str, dict], failing: str = ""):
    """Stands in for running a step's command: writes its marker (the summary given for its stage), as the command
    would at its end; `failing` names a step that fails the way a command does (an error line, exit 2)."""
    seen = []

    def launch(argv, log):
        out = Path(argv[argv.index("--out") + 1])
        seen.append(argv)
        log.write_text(" ".join(argv) + "\n")
        if out.name == failing:
            log.write_text("loading\nerror: the checkpoint is corrupt\n")
            return 2
        marker = {"pretrain": "pretrain.json", "extend": "extend.json", "quantized": "quantization_report.json",
                  "tasks": "tasks.json", "tasks-unquantized": "tasks.json", "sft": "sft.json"}[out.name]
        out.mkdir(parents=True, exist_ok=True)
        (out / marker).write_text(json.dumps(summaries[out.name]))
        return 0

    return launch, seen


def suite(on: float, off: float) -> dict:
    return SuiteAccuracy("engine", [DomainAccuracy("math", "on", 100, round(100 * on), on, 40.0),
                                    DomainAccuracy("math", "off", 100, round(100 * off), off, 10.0)]).summary()


SUMMARIES = {
    "pretrain": {"unigram_entropy": 6.6, "val_loss": 4.4},
    "extend": {"short_len": 256, "seq_len": 1024,
               "before": {"positions": {"edges": [0, 256, 512], "nll": [5.0, 4.5, 4.4], "tokens": [10, 10, 30]},
                          "short_loss": 4.40, "ruler": {"vt": {"1024": 0.0}}},
               "after": {"positions": {"edges": [0, 256, 512], "nll": [5.0, 4.6, 4.5], "tokens": [10, 10, 30]},
                         "short_loss": 4.42, "ruler": {"vt": {"1024": 20.0}}}},
    "sft": {"tasks_before": suite(0.1, 0.0), "tasks_after": suite(0.6, 0.3)},
    "quantized": {"bpe": 5.1, "bytes": 2 << 20, "bf16_bytes": 6 << 20,
                  "quality": {"perplexity": 9.1, "reference_perplexity": 9.0, "kl": 0.01, "tokens": 100}},
    "tasks-unquantized": suite(0.6, 0.3) | {"suite": {}, "seed": 0},
    "tasks": suite(0.5, 0.3) | {"suite": {}, "seed": 0},
}
SMALL = """
[pretrain]
[extend]
[sft]
[quantize]
bpe = 5.03
[eval.tasks]
"""


def test_steps_run_in_order_skip_what_finished_and_resume_what_was_cut_off(tmp_path):
    root = tmp_path / "root"
    steps = plan_steps(load_recipe(write_recipe(tmp_path, SMALL)), root)
    launch, seen = fake_launch(SUMMARIES, failing="sft")
    (root / "extend").mkdir(parents=True)
    (root / "extend" / "cpu.toml").write_text("")  # a run that started: its saved preset
    with pytest.raises(StepFailed) as failed:
        run_steps(steps, root, lambda step, how: None, lambda step: None, launch)
    assert failed.value.step.name == "sft" and failed.value.last_line == "error: the checkpoint is corrupt"
    assert [a[1] for a in seen] == ["pretrain", "extend", "sft"]
    assert seen[1][-1] == "--resume" and "--out" in seen[1]
    announced = []
    launch, seen = fake_launch(SUMMARIES)
    run_steps(steps, root, lambda step, how: announced.append((step.name, how)), lambda step: None, launch)
    assert announced == [("pretrain", "skip"), ("extend", "skip"), ("sft", "run"), ("quantize", "run"),
                         ("eval-tasks", "run"), ("eval-tasks-unquantized", "run")]
    state = read_state(root)
    assert [a["status"] for a in state["steps"]["sft"]["attempts"]] == [2, 0]
    assert step_seconds(state, "sft") >= 0 and step_seconds(state, "data") is None


def test_the_report_says_what_each_stage_moved(tmp_path):
    root = tmp_path / "root"
    recipe = load_recipe(write_recipe(tmp_path, SMALL))
    steps = plan_steps(recipe, root)
    launch, _ = fake_launch(SUMMARIES)
    run_steps(steps, root, lambda step, how: None, lambda step: None, launch)
    rows = {f.step: f for f in figures(steps, read_state(root))}
    assert (rows["pretrain"].before, rows["pretrain"].after, rows["pretrain"].improved) == ("6.600", "4.400", True)
    assert (rows["extend"].before, rows["extend"].after, rows["extend"].improved) == ("4.425", "4.525", False)
    assert "RULER vt 1024: 0 -> 20" in rows["extend"].detail and "+0.5%" in rows["extend"].detail
    assert (rows["sft"].before, rows["sft"].after, rows["sft"].improved) == ("10.0%", "60.0%", True)
    assert ("+50.0 points (beyond the held-out sample's noise: 2 unpaired standard errors are 11.5 points)"
            in rows["sft"].detail)
    assert "accuracy kept (reasoning on, mean) 83.3%" in rows["quantize"].detail
    report = write_report(root, recipe.path, list(rows.values()), steps).read_text()
    assert "Stages that did not improve their figure: extend" in report
    assert "| domain | reasoning | start | sft | quantized |" in report
    assert "| math | on | 10.0 | 60.0 | 50.0 |" in report
    assert all(step.command in report for step in steps)


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory, small_corpus):
    folder = tmp_path_factory.mktemp("recipe")
    pretrain = [*PRETRAIN_FAST, f"data.path={small_corpus}", "train.steps=3", "train.eval_interval=3",
                "train.checkpoint_interval=3", "train.mtp_depths=2"]
    extend = [f"data.path={small_corpus}", *EXTEND_FAST]
    path = write_recipe(folder, f"[pretrain]\nset = {json.dumps(pretrain)}\n[extend]\nset = {json.dumps(extend)}\n"
                                "[eval.perplexity]\nmax_tokens = 512\n")
    root = folder / "root"
    process = n3_process("recipe", "--recipe", str(path), "--out", str(root))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err + out
    return path, root, out


def test_a_small_recipe_runs_end_to_end_and_resumes(small_recipe):
    path, root, out = small_recipe
    for words in ("[1/3] pretrain: running n3 pretrain", "What each stage bought", "report: "):
        assert words in out, words
    report = (root / "report.md").read_text()
    for words in ("3 of 3 steps finished", f"n3 extend --checkpoint {root}/pretrain", "loss past 512 tokens",
                  "| eval-perplexity |", "validation loss"):
        assert words in report, words
    (root / "extend" / "extend.json").unlink()  # as if the recipe was killed before extend wrote its summary
    shutil.rmtree(root / "eval")
    process = n3_process("recipe", "--recipe", str(path), "--out", str(root))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err + out
    assert "pretrain: done before, skipped" in out and "extend: resuming" in out
    assert (root / "logs" / "extend.log").read_text().count("--resume") == 1
    assert [a["how"] for a in read_state(root)["steps"]["extend"]["attempts"]] == ["run", "resume"]


def test_from_sets_the_earlier_outputs_aside_and_runs_them_again(tmp_path, capsys):
    from n3cli.recipe import _set_aside

    root = tmp_path / "root"
    steps = plan_steps(load_recipe(write_recipe(tmp_path, SMALL)), root)
    launch, _ = fake_launch(SUMMARIES)
    run_steps(steps, root, lambda step, how: None, lambda step: None, launch)
    _set_aside(select(steps, "sft", None), root)
    assert [s.name for s in steps if s.done] == ["pretrain", "extend"]
    kept = list((root / "previous").glob("*/sft/sft.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == SUMMARIES["sft"]
    assert set(read_state(root)["steps"]) == {"pretrain", "extend"}
    assert not (root / "logs" / "sft.log").exists() and list((root / "previous").glob("*/logs/sft.log"))


TINY_MEASURED = {  # seconds each step of the default recipe took on two idle CPU cores (benchmarks/RESULTS.md)
    "pretrain": 391, "extend": 293, "sft": 446, "rlvr-math-1": 149, "rlvr-code-1": 200, "rlvr-instructions-1": 181,
    "mopd-1": 300, "rlvr-math-2": 162, "rlvr-code-2": 192, "rlvr-instructions-2": 209, "mopd-2": 269,
    "mtp-boost": 201, "quantize": 15, "eval-tasks": 59, "eval-tasks-unquantized": 48, "eval-ruler": 24,
    "eval-perplexity": 5, "eval-mtp": 160,
}
TINY_PEAK = 195e9  # that machine's fp32 matmul rate: pretrain's 5,606 tokens/s at 0.53 MFU


def test_the_dry_run_estimates_the_tiny_recipe_within_2x(tmp_path, monkeypatch):
    import presets
    from n3cli.recipe import estimate

    monkeypatch.setattr(estimate, "peak_flops", lambda device: TINY_PEAK)
    book = load_recipe("tiny")
    total = 0.0
    for step in plan_steps(book, tmp_path):
        if step.stage == "data":
            continue
        spec = book.stages[step.stage]
        seconds = estimate.estimate_seconds(step.stage, presets.load(spec.preset, step.sets), step.kind,
                                            spec.evals.get(step.kind, spec.options))
        assert 0.5 <= TINY_MEASURED[step.name] / seconds <= 2, (step.name, seconds)
        total += seconds
    assert 0.8 <= sum(TINY_MEASURED.values()) / total <= 1.25
