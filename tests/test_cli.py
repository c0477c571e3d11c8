"""The `n3` command surface and its error contract. Exit codes and stderr are checked through the installed console
script, as a user meets them; the rest runs in-process."""

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import typer
from typer.testing import CliRunner

import presets
from n3cli.main import app
from n3cli.options import DEFAULT_PRESET, DryRun, Out, Preset, Sets, load_preset

ROOT = Path(__file__).resolve().parents[1]
N3 = Path(sys.executable).parent / "n3"  # the console script `pip install -e .` put beside this interpreter


def n3(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "N3_DEBUG"} | env
    return subprocess.run([str(N3), *args], capture_output=True, text=True, env=environ, cwd=ROOT)


def test_cli_surface():
    """Changing the command surface is a decision: update this list with it."""
    root = typer.main.get_command(app)
    assert sorted(root.commands) == ["data", "eval", "extend", "mopd", "mtp-boost", "presets", "pretrain", "quantize",
                                     "recipe", "rlvr", "serve", "sft"]
    assert sorted(root.commands["presets"].commands) == ["list", "show"]
    assert sorted(root.commands["rlvr"].commands) == ["score"]
    assert sorted(root.commands["eval"].commands) == ["lm-eval", "mtp", "perplexity", "ruler", "tasks", "throughput"]
    assert sorted(p.opts[0] for p in root.params) == ["--debug", "--version"]


def test_common_options():
    probe = typer.Typer()

    @probe.command()
    def run(preset: Preset = DEFAULT_PRESET, overrides: Sets = None, out: Out = None, dry_run: DryRun = False):
        cfg = load_preset(preset, overrides)
        print(json.dumps([cfg.name, cfg.train.seq_len, str(out), dry_run]))

    result = CliRunner().invoke(probe, ["-p", "h100", "--set", "train.seq_len=1024", "--out", "runs/x", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == ["h100", 1024, "runs/x", True]
    assert json.loads(CliRunner().invoke(probe, []).output) == ["cpu", 256, "None", False]


def test_version():
    result = n3("--version")
    assert (result.returncode, result.stdout) == (0, f"n3 {version('n3')}\n") and version("n3") == "0.1.0"


def test_no_arguments_prints_help():
    result = n3()
    assert result.returncode == 0 and "presets" in result.stdout


def test_presets_list():
    result = n3("presets", "list")
    assert result.returncode == 0
    for name in presets.names() + presets.shapes():
        assert re.search(rf"\b{name}\b", result.stdout)


def test_presets_show_json():
    result = n3("presets", "show", "h200", "--set", "train.seq_len=4096", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == presets.as_dict(presets.load("h200", ["train.seq_len=4096"]))


def test_presets_show_prints_a_loadable_preset(tmp_path):
    result = CliRunner().invoke(app, ["presets", "show", "h200", "-s", "model.norm_eps=1e-6", "-s", "shape=small"])
    assert result.exit_code == 0, result.output
    saved = tmp_path / "h200.toml"
    saved.write_text(result.output)
    expected = presets.as_dict(presets.load("h200", ["model.norm_eps=1e-6", "shape=small"]))
    assert presets.as_dict(presets.load(str(saved))) == expected


def test_bad_flag_is_one_line_on_stderr_and_exit_2():
    result = n3("presets", "show", "--bogus")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: No such option: --bogus (see 'n3 presets show --help')\n"


def test_user_error_is_one_line_on_stderr_and_exit_2():
    for args in [("presets", "show", "h300"), ("presets", "show", "--set", "train.seq_len=long"), ("pretrian",)]:
        result = n3(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and "╭" not in result.stderr


def test_debug_shows_the_traceback():
    for result in [n3("presets", "show", "h300", "--debug"), n3("presets", "show", "h300", N3_DEBUG="1")]:
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "UserError: unknown preset 'h300'" in result.stderr


def test_help_and_presets_do_not_import_torch():
    """`n3 --help` and `n3 presets` answer in well under a second: nothing on their path may import torch."""
    probe = "import sys\nfrom n3cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    probe += "assert 'torch' not in sys.modules, 'torch was imported'\n"
    for args in (["--help"], ["presets", "list"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_commands():
    """.ci/run performs the README's test install and test command, verbatim."""
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.strip().startswith(("pip install", "python -m pytest"))]
    assert len(commands) == 2 and all(command in readme for command in commands)
