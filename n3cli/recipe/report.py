"""What each stage of a recipe bought: the figure it exists to move, before and after, read from the summaries the
stages wrote (pretrain.json, extend.json, sft.json, ...), with the wall time runner.py recorded.

`figures(steps, state)` gives one Figure per step that finished; `write_report` turns them into report.md and
accuracy.png under the recipe's root; the CLI prints the same table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from n3cli.recipe.runner import step_seconds
from n3cli.recipe.steps import Step
from stages.runtime.files import write_text
from stages.runtime.metrics import read_metrics
from stages.runtime.plots import plot_lines

MODES = ("on", "off")


@dataclass
class Figure:
    step: str
    command: str
    seconds: float | None
    figure: str
    """What the stage exists to move."""
    before: str
    after: str
    improved: bool | None
    """None where the stage has nothing to improve (data, eval)."""
    detail: str = ""
    """The figure's movement in words, and the stage's other figures."""


def figures(steps: list[Step], state: dict) -> list[Figure]:
    """A Figure for every finished step, in order."""
    out = []
    for step in steps:
        if not step.done:
            continue
        summary = json.loads(step.marker.read_text())
        reader = READERS.get(step.stage, _eval)
        figure, before, after, improved, detail = reader(step, summary, steps)
        out.append(Figure(step.name, step.command, step_seconds(state, step.name), figure, before, after, improved,
                          detail))
    return out


def _data(step: Step, s: dict, steps) -> tuple:
    tokens = sum(source["splits"]["train"]["tokens"] for source in s["sources"])
    return "corpus prepared", "-", f"{tokens:,} training tokens, vocabulary {s['vocab_size']:,}", None, ""


def _pretrain(step: Step, s: dict, steps) -> tuple:
    before, after = s["unigram_entropy"], s["val_loss"]
    return ("validation loss, nats/token (before: the unigram entropy, a model that ignores context)",
            f"{before:.3f}", f"{after:.3f}", after < before, f"{after - before:+.3f}")


def _extend(step: Step, s: dict, steps) -> tuple:
    short = s["short_len"]
    b, a = (_past(s[k]["positions"], short) for k in ("before", "after"))
    sb, sa = s["before"]["short_loss"], s["after"]["short_loss"]
    ruler = "; ".join(f"RULER {task} " + ", ".join(f"{n}: {s['before']['ruler'][task][n]:.0f} -> {v:.0f}"
                                                   for n, v in scores.items())
                      for task, scores in s["after"]["ruler"].items())
    pos_b, pos_a = s["before"]["positions"], s["after"]["positions"]
    buckets = ", ".join(f"from {edge}: {nb:.3f} -> {na:.3f}"
                        for edge, nb, na in zip(pos_a["edges"], pos_b["nll"], pos_a["nll"]))
    detail = (f"{a - b:+.3f}; loss by position {buckets}; short-context loss {sb:.3f} -> {sa:.3f} "
              f"({100 * (sa - sb) / sb:+.1f}%); {ruler}")
    return (f"loss past {short} tokens (held-out long documents, to {s['seq_len']})", f"{b:.3f}", f"{a:.3f}", a < b,
            detail)


def _past(positions: dict, short: int) -> float:
    """Token-weighted loss of the buckets that start at or past `short`."""
    pairs = [(n, t) for edge, n, t in zip(positions["edges"], positions["nll"], positions["tokens"]) if edge >= short]
    return sum(n * t for n, t in pairs) / max(1, sum(t for _, t in pairs))


def _tasks_stage(step: Step, s: dict, steps) -> tuple:
    before, after = accuracy(s["tasks_before"]), accuracy(s["tasks_after"])
    domains = sorted({d for d, _ in after})
    b, a = _mean(before, domains, "on"), _mean(after, domains, "on")
    noise = _noise(s["tasks_before"], s["tasks_after"], domains)
    detail = f"{100 * (a - b):+.1f} points ({noise}); " + "; ".join(
        f"{d} {m} {100 * before.get((d, m), 0):.1f} -> {100 * after[(d, m)]:.1f}"
        for d in domains for m in MODES if (d, m) in after)
    if step.stage == "mopd":  # its figure is the distance to the teachers; accuracy is what that distance buys
        kl = _reverse_kl(step.out / "metrics.jsonl")
        teachers = {d: accuracy(t) for d, t in s["teachers_accuracy"].items()}
        t = sum(teachers[d].get((d, "on"), 0) for d in domains) / len(domains)
        detail = (f"held-out accuracy, reasoning on (mean) {100 * b:.1f}% -> {100 * a:.1f}% (teachers {100 * t:.1f}%)"
                  f"; {detail.split('; ', 1)[1]}")
        if kl is None:
            return "reverse KL to the teachers", "-", "-", None, detail
        (first, last), span = kl
        return (f"reverse KL to the teachers, nats/token (mean of the first and last {span} steps)", f"{first:.4f}",
                f"{last:.4f}", last < first, f"{last - first:+.4f}; {detail}")
    what = f"held-out accuracy of {', '.join(domains)}, reasoning on (mean)"
    return what, f"{100 * b:.1f}%", f"{100 * a:.1f}%", a > b, detail


def _reverse_kl(metrics: Path) -> tuple[tuple[float, float], int] | None:
    """The reverse KL of the first and of the last steps (up to five each), and how many, from metrics.jsonl."""
    records = read_metrics(metrics) if metrics.is_file() else []
    kl = [r["reverse_kl"] for r in records if r.get("reverse_kl") is not None]
    if not kl:
        return None
    span = min(5, max(1, len(kl) // 2))
    return (sum(kl[:span]) / span, sum(kl[-span:]) / span), span


def _mtp_boost(step: Step, s: dict, steps) -> tuple:
    def length(which: str, name: str) -> tuple[int, float]:
        per_depth = s[which]["acceptance"][name]["per_depth"]
        return per_depth[-1]["depth"], per_depth[-1]["acceptance_length"]

    depth, b = length("before", "greedy")
    _, a = length("after", "greedy")
    _, tb = length("before", "temperature 1")
    _, ta = length("after", "temperature 1")
    best = s["after"]["acceptance"]["greedy"]["best"]
    return (f"acceptance length at draft length {depth}, greedy", f"{b:.3f}", f"{a:.3f}", a > b,
            f"{a - b:+.3f}; at temperature 1 {tb:.3f} -> {ta:.3f}; decode speedup {best['speedup']:.2f}x at draft "
            f"length {best['depth']}")


def _quantize(step: Step, s: dict, steps) -> tuple:
    q = s.get("quality") or {}
    detail = (f"{s['bytes'] / 2**20:.1f} MiB against {s['bf16_bytes'] / 2**20:.1f} MiB in BF16; perplexity "
              f"{q.get('reference_perplexity', 0):.3f} -> {q.get('perplexity', 0):.3f}, KL {q.get('kl', 0):.4f} "
              "nats/token")
    kept = _accuracy_kept(steps)
    if kept is not None:
        detail += f"; held-out accuracy kept (reasoning on, mean) {100 * kept:.1f}%"
    return ("bits per element (16: BF16)", "16.00", f"{s['bpe']:.2f}", s["bpe"] < 16, detail)


def _accuracy_kept(steps: list[Step]) -> float | None:
    by_name = {s.name: s for s in steps}
    pair = [by_name.get(n) for n in ("eval-tasks-unquantized", "eval-tasks")]
    if not all(s is not None and s.done for s in pair):
        return None
    ref, quantized = (accuracy(json.loads(s.marker.read_text())) for s in pair)
    domains = sorted({d for d, _ in ref})
    base = _mean(ref, domains, "on")
    return _mean(quantized, domains, "on") / base if base else None


def _eval(step: Step, s: dict, steps) -> tuple:
    kind = step.name.removeprefix("eval-")
    if kind.startswith("tasks"):
        acc = accuracy(s)
        domains = sorted({d for d, _ in acc})
        line = "; ".join(f"{d} {m} {100 * acc[(d, m)]:.1f}" for d in domains for m in MODES if (d, m) in acc)
        return "held-out accuracy (%)", "-", line, None, ""
    if kind == "ruler":
        lengths = [str(n) for n in s["lengths"]]
        means = {n: sum(t["scores"][n] for t in s["tasks"].values()) / max(1, len(s["tasks"])) for n in lengths}
        return "RULER mean score", "-", ", ".join(f"{n}: {v:.1f}" for n, v in means.items()), None, ""
    if kind == "perplexity":
        return "perplexity (corpus validation split)", "-", f"{s['perplexity']:.3f}", None, f"{s['nll']:.4f} nats"
    if kind == "mtp":
        runs = {r["temperature"]: r for r in s["runs"]}
        line = ", ".join(f"T={t:g}: {r['per_depth'][-1]['acceptance_length']:.3f} at draft length "
                         f"{r['per_depth'][-1]['depth']}, {r['best']['speedup']:.2f}x" for t, r in runs.items())
        return "MTP acceptance length", "-", line, None, ""
    return kind, "-", "done", None, ""


READERS = {"data": _data, "pretrain": _pretrain, "extend": _extend, "sft": _tasks_stage, "rlvr": _tasks_stage,
           "mopd": _tasks_stage, "mtp-boost": _mtp_boost, "quantize": _quantize}


def _noise(before: dict, after: dict, domains: list[str]) -> str:
    """Whether a change of the domains' mean accuracy (reasoning on) is beyond what the held-out sample's size
    explains: two standard errors of the difference of two independent binomial means (the problems are the same
    before and after, so this bounds the noise from above)."""
    variance = 0.0
    for summary in (before, after):
        for r in summary["results"]:
            if r["domain"] in domains and r["reasoning"] == "on" and r["problems"]:
                p = r["accuracy"]
                variance += p * (1 - p) / r["problems"]
    bound = 2 * math.sqrt(variance) / len(domains)
    a, b = (_mean(accuracy(x), domains, "on") for x in (after, before))
    where = "beyond" if abs(a - b) > bound else "within"
    return f"{where} the held-out sample's noise: 2 unpaired standard errors are {100 * bound:.1f} points"


def accuracy(summary: dict | None) -> dict[tuple[str, str], float]:
    """{(domain, reasoning mode): accuracy} of a SuiteAccuracy summary."""
    return {(r["domain"], r["reasoning"]): r["accuracy"] for r in (summary or {}).get("results", [])}


def _mean(acc: dict, domains: list[str], mode: str) -> float:
    return sum(acc.get((d, mode), 0.0) for d in domains) / max(1, len(domains))


def verdict(f: Figure) -> str:
    return "" if f.improved is None else "better" if f.improved else "NOT better"


def wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    if hours:
        return f"{hours} h {m:02d} min"
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def write_report(root: Path, recipe_path: Path, rows: list[Figure], steps: list[Step]) -> Path:
    """report.md (and accuracy.png) under `root`; returns the report's path."""
    total = sum(f.seconds or 0 for f in rows)
    lines = [f"# n3 recipe: {recipe_path}", "",
             f"{len(rows)} of {len(steps)} steps finished; wall time {wall(total)}.", "",
             "| step | wall time | figure | before | after | |", "|---|---|---|---|---|---|"]
    lines += [f"| {f.step} | {wall(f.seconds)} | {f.figure} | {f.before} | {f.after} | {verdict(f)} |" for f in rows]
    worse = [f for f in rows if f.improved is False]
    if worse:
        lines += ["", "Stages that did not improve their figure: " + "; ".join(
            f"{f.step} ({f.figure}: {f.before} -> {f.after}, {f.detail.split(';')[0]})" for f in worse) + "."]
    lines += ["", "## Details", ""] + [f"- **{f.step}**: {f.detail}" for f in rows if f.detail]
    points = accuracy_points(steps)
    if len(points) > 1:
        lines += ["", "## Held-out accuracy through the pipeline", "",
                  "Greedy, the same held-out problems at every stage (%); teachers are the RLVR runs of one domain.",
                  "", "| domain | reasoning | " + " | ".join(name for name, _ in points) + " |",
                  "|---|---|" + "---|" * len(points)]
        domains = sorted({d for _, acc in points for d, _ in acc})
        lines += [f"| {d} | {m} | " + " | ".join(f"{100 * acc[(d, m)]:.1f}" if (d, m) in acc else "-"
                                                for _, acc in points) + " |" for d in domains for m in MODES]
        if _plot_accuracy(root / "accuracy.png", points, domains):
            lines += ["", "![held-out accuracy through the pipeline](accuracy.png)"]
    pictures = [p for s in steps if s.done for p in sorted(s.out.glob("*.png"))]
    if pictures:
        lines += ["", "Each stage's own plots: " + ", ".join(f"[{p.relative_to(root)}]({p.relative_to(root)})"
                                                           for p in pictures) + "."]
    lines += ["", "## Commands", "", "Each step is the command below, as a user would type it:", "", "```"]
    lines += [s.command for s in steps] + ["```", ""]
    return write_text(root / "report.md", "\n".join(lines))


def accuracy_points(steps: list[Step]) -> list[tuple[str, dict]]:
    """(after which step, {(domain, mode): accuracy}) for every measurement of held-out accuracy, in order: the
    start (what SFT measured first), each model stage after training, each teacher, the quantized model."""
    points: list[tuple[str, dict]] = []
    for step in steps:
        if not step.done or step.stage not in ("sft", "rlvr", "mopd") and step.name != "eval-tasks":
            continue
        s = json.loads(step.marker.read_text())
        if step.name == "eval-tasks":
            points.append(("quantized", accuracy(s)))
            continue
        if not points:
            points.append(("start", accuracy(s["tasks_before"])))
        points.append((step.name, accuracy(s["tasks_after"])))
    return points


def _plot_accuracy(out: Path, points: list[tuple[str, dict]], domains: list[str]) -> bool:
    """The mean over the domains, reasoning on and off, after each model stage (teachers left out: each knows one
    domain); False if matplotlib is missing."""
    models = [(name, acc) for name, acc in points if not name.startswith("rlvr-")]
    series = {f"reasoning {m}": ([n for n, _ in models], [100 * _mean(acc, domains, m) for _, acc in models])
              for m in MODES}
    return not plot_lines(series, out, "after stage", "held-out accuracy, mean of the domains (%)").startswith("no ")
