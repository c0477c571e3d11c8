"""The steps of a recipe: each one an `n3` command a user could type, with the folder it writes and what it reads.

Each stage's output is the next one's input: data -> pretrain -> extend -> sft -> per cycle (one `n3 rlvr --env D`
teacher per domain from the cycle's student, then `n3 mopd` of that student with those teachers; the next cycle's
student is this one's result) -> mtp-boost -> quantize -> eval (of the quantized checkpoint; its tasks also of the
unquantized one, for the accuracy quantization keeps). A stage the recipe leaves out is skipped and the chain goes
around it. Every folder lies under the recipe's root (runs/recipe by default).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import presets
from n3cli.recipe.book import STAGES, Recipe, StageSpec, command_of, option_argv

MARKERS = {
    "data": "manifest.json", "pretrain": "pretrain.json", "extend": "extend.json", "sft": "sft.json",
    "rlvr": "rlvr.json", "mopd": "mopd.json", "mtp-boost": "mtp-boost.json", "quantize": "quantization_report.json",
}
"""The file each command writes last: its presence means the step finished. Eval commands write <kind>.json."""
RESUMABLE = {"pretrain", "extend", "sft", "rlvr", "mopd", "mtp-boost"}
"""Stages with --resume: a killed run continues from its last checkpoint. The others start again."""


@dataclass
class Step:
    name: str
    """Unique in the recipe: the stage, or the stage with its domain and cycle (rlvr-math-1, mopd-2, eval-ruler)."""
    stage: str
    argv: list[str]
    """The command, from "n3"."""
    out: Path
    marker: Path
    inputs: list[Path] = field(default_factory=list)
    """Folders of earlier steps it reads."""
    made_by: dict[str, str] = field(default_factory=dict)
    """Input folder -> the step that makes it."""
    sets: list[str] = field(default_factory=list)
    """Its --set lines: with its stage's preset, the configuration it runs."""

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def kind(self) -> str:
        """What of its stage the step runs: an eval step's kind (tasks, ruler, ...), the environment an rlvr teacher
        trains on (its --env); "" for other steps."""
        if self.stage == "eval":
            return self.argv[2]
        if self.stage == "rlvr" and "--env" in self.argv:
            return self.argv[self.argv.index("--env") + 1]
        return ""

    @property
    def done(self) -> bool:
        return self.marker.is_file()

    @property
    def resumable(self) -> bool:
        """A run of it was started and can continue: a resumable stage whose folder holds its saved preset."""
        return self.stage in RESUMABLE and self.out.is_dir() and any(self.out.glob("*.toml"))

    def resume_argv(self) -> list[str]:
        """The command that continues a killed run: --resume, with the run's saved preset instead of --preset."""
        argv, i = [], 0
        while i < len(self.argv):
            if self.argv[i] == "--preset":
                i += 2
                continue
            argv.append(self.argv[i])
            i += 1
        return [*argv, "--resume"]


def plan_steps(recipe: Recipe, root: Path, cycles: int | None = None) -> list[Step]:
    """Every step of the recipe, in order, under `root`."""
    cycles = cycles or recipe.cycles
    st = recipe.stages
    steps: list[Step] = []
    corpus = root / "corpus"
    student: Step | None = None  # the step whose output the next model stage starts from

    def add(spec: StageSpec, name: str, out: Path, extra: list[str], start: Step | None = None,
            reads: list[Step] = (), command: tuple[str, ...] | None = None, options: dict | None = None,
            marker: str | None = None, sets: list[str] = ()) -> Step:
        command = command or (spec.name,)
        sources = [s for s in (start, *reads) if s is not None]
        argv = ["n3", *command]
        if start is not None:
            argv += ["--checkpoint", str(start.out)]
        argv += extra
        if spec.preset != presets.DEFAULT_PRESET:
            argv += ["--preset", spec.preset]
        sets = [*spec.sets, *sets]
        for item in sets:
            argv += ["--set", item]
        argv += option_argv(command_of(command), spec.options if options is None else options)
        argv += ["--out", str(out)]
        step = Step(name, spec.name, argv, out, out / (marker or MARKERS[spec.name]), [s.out for s in sources],
                    {str(s.out): s.name for s in sources}, sets)
        steps.append(step)
        return step

    corpus_sets = []
    if "data" in st:
        data = add(st["data"], "data", corpus, [])
        corpus_sets = ["--set", f"data.path={corpus}"]
    else:
        data = None
    for name in ("pretrain", "extend", "sft"):
        if name in st:
            extra = corpus_sets if name in ("pretrain", "extend") else []
            reads = [data] if data is not None and name in ("pretrain", "extend") else []
            student = add(st[name], name, root / name, extra, start=student, reads=reads)
    for cycle in range(1, cycles + 1):
        if "rlvr" not in st:
            break
        teachers = {}
        for domain in st["rlvr"].domains:
            teachers[domain] = add(st["rlvr"], f"rlvr-{domain}-{cycle}", root / f"rlvr-{domain}-{cycle}",
                                   ["--env", domain], start=student, sets=st["rlvr"].domain_sets.get(domain, []))
        if "mopd" not in st:
            break
        extra = [a for d, t in teachers.items() for a in ("--teacher", f"{d}={t.out}")]
        extra += [a for d in teachers for a in ("--env", d)]
        student = add(st["mopd"], f"mopd-{cycle}", root / f"mopd-{cycle}", extra, start=student,
                      reads=list(teachers.values()))
    if "mtp-boost" in st:
        student = add(st["mtp-boost"], "mtp-boost", root / "mtp-boost", [], start=student)
    final = student
    if "quantize" in st:
        final = add(st["quantize"], "quantize", root / "quantized", [], start=student)
    if "eval" in st:
        spec = st["eval"]
        for kind, options in spec.evals.items():
            extra = ["--data", _corpus_of(recipe, corpus if data else None)] if kind == "perplexity" else []
            add(spec, f"eval-{kind}", root / "eval" / kind, extra, start=final,
                reads=[data] if extra and data else [], command=("eval", kind), options=options,
                marker=f"{kind}.json")
            if kind == "tasks" and final is not student and student is not None:  # what quantization keeps
                add(spec, "eval-tasks-unquantized", root / "eval" / "tasks-unquantized", [], start=student,
                    command=("eval", kind), options=options, marker="tasks.json")
    return steps


def _corpus_of(recipe: Recipe, made: Path | None) -> str:
    """The corpus perplexity is measured on: the recipe's own, else the one its pretraining names (data.path)."""
    from model.errors import UserError

    if made is not None:
        return str(made)
    for spec in (recipe.stages.get(name) for name in ("pretrain", "extend")):
        if spec is not None and (path := presets.load(spec.preset, spec.sets).data.path):
            return path
    raise UserError(f"{recipe.path}: [eval.perplexity] needs a corpus: add a [data] table, or set data.path in "
                    "[pretrain]")


def select(steps: list[Step], start: str | None, until: str | None) -> list[Step]:
    """The steps from `start`'s first to `until`'s last (a stage name, e.g. mopd, or a step's, e.g. mopd-2)."""
    first = 0 if start is None else _positions(steps, start, "--from")[0]
    last = len(steps) - 1 if until is None else _positions(steps, until, "--until")[-1]
    return steps[first:last + 1]


def _positions(steps: list[Step], name: str, flag: str) -> list[int]:
    from model.errors import UserError

    found = [i for i, s in enumerate(steps) if name in (s.stage, s.name)]
    if not found:
        listed = sorted({s.stage for s in steps}, key=STAGES.index)
        if name in STAGES:
            raise UserError(f"{flag} {name}: this recipe has no {name} stage (it runs {', '.join(listed)})")
        raise UserError(f"{flag} {name!r}: not a stage ({', '.join(STAGES)}) or a step of this recipe "
                        f"({', '.join(s.name for s in steps)})")
    return found
