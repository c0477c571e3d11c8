"""Rich rendering of what stages return: the dry-run plan. Formatting only; the numbers come from stages/."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stages.plan import Plan

console = Console()


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.235M'; with unit='B', bytes in decimal units as model cards state them (1.121TB)."""
    for prefix in ("", "K", "M", "G" if unit else "B", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.4g}{prefix}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def print_plan(plan: Plan) -> None:
    cfg, p = plan.config, plan.params
    main_total, main_active = p.without_mtp()
    console.print(f"[bold]{cfg.name}[/]: {cfg.description} (shape [bold]{cfg.shape}[/], built on the meta device)")

    counts = Table(title="Parameters", show_edge=False)
    for column in ("", "total", "active per token"):
        counts.add_column(column, justify="right" if column else "left")
    counts.add_row("model + MTP", human(p.total), human(p.active))
    if cfg.model.mtp_pattern:
        counts.add_row("model without MTP", human(main_total), human(main_active))
    embedding = p.by_block["embedding"][0]
    counts.add_row("  counting the whole embedding table", "", human(main_active - cfg.model.hidden_size + embedding))
    counts.add_row("routed experts", human(p.routed), "")
    counts.add_section()
    pattern = cfg.model.main_pattern
    kinds = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}
    for label, (total, active) in p.by_block.items():
        n = pattern.count(kinds[label]) if label in kinds else None
        counts.add_row(f"{label}" + (f" x{n}" if n else ""), human(total), human(active))
    console.print(counts)

    sizes = "  ".join(f"{name} {human(b, 'B')}" for name, b in plan.weight_bytes.items())
    console.print(f"weights stored as: {sizes}")
    if plan.gemm_formats:
        gemms = sum(plan.gemm_formats.values())
        shares = ", ".join(f"{fmt} {human(n)} ({n / gemms:.1%})" for fmt, n in sorted(plan.gemm_formats.items(),
                                                                                      key=lambda item: -item[1]))
        console.print(f"GEMM weights by format ({cfg.precision.compute} recipe): {shares}")
    lay, train = plan.layout, cfg.train
    console.print(
        f"precision: master weights {cfg.precision.params}, compute {cfg.precision.compute}\n"
        f"parallel: {cfg.parallel.strategy}, world {lay['world']} = data {lay['data']} x tensor {lay['tensor']}"
        f" x pipeline {lay['pipeline']} x context {lay['context']}; expert {lay['expert']}\n"
        f"batch: {train.micro_batch_size} x {train.seq_len} tokens per device, global {train.global_batch_size}"
        f" sequences ({human(train.global_batch_size * train.seq_len)} tokens), {plan.grad_accumulation} accumulation"
        f" step(s)\n"
        f"per device: {human(plan.params_per_device)} parameters, {human(plan.state_bytes_per_device, 'B')} of weights,"
        f" gradients and Adam state\n"
        f"activations per device: {human(plan.activation_bytes, 'B')} for a micro-batch of "
        f"{human(plan.tokens_per_device)} tokens ({'with' if train.activation_checkpointing else 'without'} "
        f"activation checkpointing; {human(plan.activation_bytes_full, 'B')} without, "
        f"{human(plan.activation_bytes_checkpointed, 'B')} with)\n"
        f"kernels: " + ", ".join(f"{op} {name}" for op, name in vars(cfg.kernels).items())
    )
    for line in plan.runs:
        console.print(line)


def print_serve_plan(plan) -> None:
    """What `n3 serve` would load and preallocate (stages.serve.ServePlan)."""
    engine, model = plan.engine, plan.model
    context = engine.max_len or model.max_position_embeddings
    console.print(
        f"[bold]{plan.model_name}[/]: {plan.checkpoint}\n"
        f"model: pattern {model.pattern}, hidden {model.hidden_size}, vocab {model.vocab_size}; weights in {plan.dtype}"
        f" {human(plan.weight_bytes, 'B')}\n"
        f"engine: {engine.max_batch} requests x {context} tokens of context, {engine.max_step_tokens} tokens per step,"
        f" MTP speculation {engine.speculative_tokens or 'off'}"
        + (f" ({engine.speculative_tokens} drafts)" if engine.speculative_tokens else "")
        + f", SSM state {engine.ssm_dtype}"
        + (" with stochastic rounding" if engine.ssm_dtype != "fp32" and engine.stochastic_rounding else "")
        + (", compiled decode step" if engine.compile else "")
        + f"\ncaches (preallocated): {human(plan.cache_bytes, 'B')}"
    )


def print_pretrain(result) -> None:
    """The end of `n3 pretrain`: what was trained, how well, where it is, and what it writes."""
    loop = result.loop
    table = Table(title=f"Pretrained {result.run}", show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("parameters", human(result.parameters))
    if loop is None:
        table.add_row("steps", f"{result.total_steps} (the run was complete already)")
    else:
        table.add_row("steps", f"{result.start_step} -> {result.total_steps}")
        table.add_row("tokens trained", human(loop.tokens))
        table.add_row("training time", f"{loop.seconds:.0f} s ({human(loop.tokens / loop.seconds)} tokens/s)")
        table.add_row("final training loss", f"{loop.last['loss']:.3f} (next-token {loop.last['ce']:.3f})")
        if loop.val_loss is not None:
            table.add_row("validation loss", f"{loop.val_loss:.3f} nats/token")
    table.add_row("unigram entropy of the corpus", f"{result.unigram_entropy:.3f} nats/token")
    table.add_row("checkpoint", str(result.checkpoint))
    if loop is not None and loop.warnings:
        table.add_row("warnings", str(len(loop.warnings)))
    console.print(table)
    console.print(f"[bold]sample[/] (prompt, then the model's continuation):\n{result.prompt}[cyan]{result.sample}[/]")


def print_corpus(prepared) -> None:
    """The end of `n3 data`: what the corpus holds and how it will be sampled."""
    m = prepared.manifest
    done = {"built": "prepared", "reblended": "blend updated (shards unchanged)", "up to date": "up to date, nothing to do"}
    console.print(f"[bold]{prepared.directory}[/]: {done[prepared.work]}")
    table = Table(show_edge=False)
    for column in ("source", "train tokens", "docs", "val tokens", "quality", f"phase 1 (< {m.switch_at:.0%})",
                   "phase 2"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for s in m.sources:
        train, val = s.splits["train"], s.splits["val"]
        table.add_row(
            s.name, human(train.tokens), human(train.documents + val.documents), human(val.tokens),
            "yes" if s.quality else "", f"{m.phases[0].weights[s.name]:.1%}", f"{m.phases[1].weights[s.name]:.1%}",
        )
    console.print(table)
    console.print(
        f"vocabulary {m.vocab_size} ({m.dtype} shards); {m.duplicates_removed} duplicate documents removed; "
        f"unigram entropy {m.unigram_entropy:.3f} nats/token"
    )
    for note in m.notes:
        console.print(f"note: {note}")


def print_chat_data(data, steps: int, rows_per_step: int) -> None:
    """What `n3 sft` trains on (stages.sft.ChatData): sources, reasoning modes, packing."""
    stats = data.train.stats
    table = Table("source", "weight", "conversations", "samples", "tokens", title="SFT data", show_edge=False)
    for s in data.sources:
        table.add_row(s.name, f"{s.weight:g}", str(s.conversations), str(s.samples), human(s.tokens))
    console.print(table)
    modes = ", ".join(f"{name} {count}" for name, count in data.modes.items() if count)
    skipped = [f"{data.nothing_to_train} with nothing to train"] if data.nothing_to_train else []
    skipped += [f"{data.bad_rows} malformed rows (--skip-bad)"] if data.bad_rows else []
    skipped += [f"{stats.too_long} samples longer than {stats.seq_len} tokens"] if stats.too_long else []
    console.print(
        f"reasoning: {modes}\n"
        f"packed: {stats.samples} samples into {stats.rows} rows of {stats.seq_len} tokens, efficiency "
        f"{stats.efficiency:.1%} (non-padding), {human(stats.trained)} tokens take a loss\n"
        + (f"skipped: {', '.join(skipped)}\n" if skipped else "")
        + f"training: {steps} steps of {rows_per_step} rows ({steps * rows_per_step / max(1, stats.rows):.2f} epochs)"
    )


def print_sft(result) -> None:
    """The end of `n3 sft`: the data, the training, the accuracy before and after, where the checkpoint is."""
    loop = result.loop
    print_chat_data(result.data, result.total_steps, result.rows_per_step)
    table = Table(title=f"Fine-tuned {result.start} -> {result.run}", show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    if loop is None:
        table.add_row("steps", f"{result.total_steps} (the run was complete already)")
    else:
        table.add_row("steps", f"{result.start_step} -> {result.total_steps}")
        table.add_row("training time", f"{loop.seconds:.0f} s ({human(loop.tokens / loop.seconds)} tokens/s)")
        table.add_row("final training loss", f"{loop.last['loss']:.3f} (next-token {loop.last['ce']:.3f})")
        if loop.val_loss is not None:
            table.add_row("validation loss", f"{loop.val_loss:.3f} nats/token (held-out conversations)")
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    if result.before is not None and result.after is not None:
        print_task_change(result.before, result.after)


def print_tasks(result) -> None:
    """`n3 eval tasks`: accuracy per domain and reasoning mode (stages.envs.suite.SuiteAccuracy)."""
    table = Table("domain", "reasoning", "accuracy", "reward", "reply tokens", "problems", title="Held-out tasks",
                  show_edge=False)
    for r in result.results:
        table.add_row(r.domain, r.reasoning, f"{r.accuracy:.1%}", f"{r.reward:.3f}", f"{r.tokens:.1f}",
                      str(r.problems) + (f" ({r.errors} checker errors)" if r.errors else ""))
    console.print(table)


def print_task_change(before, after) -> None:
    """Accuracy before and after a stage, per domain and reasoning mode."""
    table = Table("domain", "reasoning", "before", "after", "change", "reply tokens",
                  title="Held-out accuracy (greedy; reply tokens after)", show_edge=False)
    for r in after.results:
        b = before.get(r.domain, r.reasoning)
        start = b.accuracy if b else float("nan")
        table.add_row(r.domain, r.reasoning, f"{start:.1%}", f"{r.accuracy:.1%}", f"{r.accuracy - start:+.1%}",
                      f"{r.tokens:.1f}")
    for mode in ("on", "off"):
        pairs = [(before.get(r.domain, mode), r) for r in after.results if r.reasoning == mode]
        if pairs and all(b is not None for b, _ in pairs):
            start = sum(b.accuracy for b, _ in pairs) / len(pairs)
            end = sum(a.accuracy for _, a in pairs) / len(pairs)
            table.add_row("mean", mode, f"{start:.1%}", f"{end:.1%}", f"{end - start:+.1%}", "", style="bold")
    console.print(table)


def print_rlvr(result) -> None:
    """The end of `n3 rlvr`: the run, the last step's rewards, the accuracy before and after, the checkpoint."""
    last = result.last
    table = Table(title=f"RL on {', '.join(result.environments)}: {result.start} -> {result.run}",
                  show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    if result.start_step >= result.steps:
        table.add_row("steps", f"{result.steps} (the run was complete already)")
    else:
        table.add_row("steps", f"{result.start_step} -> {result.steps} in {result.seconds:.0f} s")
        table.add_row("last step", f"reward {last['reward']:.3f}, accuracy {last['accuracy']:.1%}, "
                      f"zero-variance groups {last['zero_variance']:.0%}")
        seconds = last["seconds"]
        table.add_row("time per step", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "step"))
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    if result.before is not None and result.after is not None:
        print_task_change(result.before, result.after)


def print_mopd(result) -> None:
    """The end of `n3 mopd`: the teachers, the reverse KL per domain, and per domain the student's held-out accuracy
    before and after against its teacher's."""
    last = result.last or {}
    table = Table(title=f"MOPD: {result.student} -> {result.run}", show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for domain, source in result.teachers.items():
        table.add_row(f"{domain} teacher", source)
    table.add_row("steps", f"{result.steps} in {result.seconds:.0f} s")
    kl = {k.removeprefix("reverse_kl/"): v for k, v in last.items() if k.startswith("reverse_kl/")}
    if kl:
        table.add_row("reverse KL, last step", ", ".join(f"{d} {v:.3f}" for d, v in kl.items()))
    if "seconds" in last:
        table.add_row("time per step", ", ".join(f"{k} {v:.1f} s" for k, v in last["seconds"].items()))
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    if result.before is None or result.after is None:
        return
    rows = Table("domain", "reasoning", "student before", "teacher", "student after", "after / teacher",
                 title="Held-out accuracy against each domain's teacher", show_edge=False)
    for after in result.after.results:
        before = result.before.get(after.domain, after.reasoning)
        teacher = result.teacher_accuracy.get(after.domain)
        own = teacher.get(after.domain, after.reasoning) if teacher else None
        share = f"{after.accuracy / own.accuracy:.0%}" if own and own.accuracy else "-"
        rows.add_row(after.domain, after.reasoning, f"{before.accuracy:.1%}" if before else "-",
                     f"{own.accuracy:.1%}" if own else "-", f"{after.accuracy:.1%}", share)
    console.print(rows)


def print_acceptance(result, title: str) -> None:
    """One stages.eval.mtp.AcceptanceResult: per draft length its acceptance length, the deepest run's cumulative
    and conditional per-position acceptance, and the decode speed against plain decoding."""
    table = Table("draft length", "acceptance length", f"position accepted (length {result.runs[-1].depth})",
                  "given the one before", "tokens/s", "speedup", title=title)
    table.add_row("0 (plain)", "1.000", "", "", f"{result.plain_tokens_per_s:.0f}", "1.00x")
    for run, rate, conditional in zip(result.runs, result.rates, result.conditional):
        table.add_row(str(run.depth), f"{run.length:.3f}", f"{rate:.3f}", f"{conditional:.3f}",
                      f"{run.tokens_per_s:.0f}", f"{run.speedup:.2f}x")
    console.print(table)


def print_mtp_boost(result) -> None:
    """The end of `n3 mtp-boost`: what trained, then before and after on the held-out prompts: acceptance length per
    draft length (greedy, temperature 1), each depth's KL to the backbone, per-position acceptance, the speedup."""
    from stages.mtp_boost import TEMPERATURES

    loop = result.loop
    table = Table(title=f"MTP boost: {result.start} -> {result.run}", show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    if result.initialised:
        table.add_row("MTP head", "built (--init)")
    for name, replies in result.replies.items():
        table.add_row(f"replies ({name})", f"{replies['prompts']:,} ({replies['tokens']:,} tokens)")
    table.add_row("steps", f"{result.steps}" + (f" in {loop.seconds:.0f} s" if loop else " (done before)"))
    table.add_row("wall time", wall_time(result.seconds))
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    before, after = result.before, result.after
    names = list(TEMPERATURES)
    lengths = Table("draft length", *(f"{n} {w}" for n in names for w in ("before", "after")), "KL before",
                    "KL after", title="Acceptance length (held-out prompts) and each depth's KL to the backbone",
                    show_edge=False)
    for j, (kl_b, kl_a) in enumerate(zip(before.kl, after.kl)):
        cells = [f"{m.acceptance[n].runs[j].length:.3f}" for n in names for m in (before, after)]
        lengths.add_row(str(j + 1), *cells, f"{kl_b:.3f}", f"{kl_a:.3f}")
    console.print(lengths)
    deepest = len(after.kl)
    rates = Table("draft position", *(f"{n} {w}" for n in names for w in ("before", "after")),
                  title=f"Share of steps accepting the draft at each position (draft length {deepest})",
                  show_edge=False)
    for j in range(deepest):
        rates.add_row(str(j + 1), *(f"{m.acceptance[n].rates[j]:.3f}" for n in names for m in (before, after)))
    console.print(rates)
    for n in names:
        b, a = before.acceptance[n], after.acceptance[n]
        console.print(f"decode speedup at the fastest draft length, {n}: before {b.best.speedup:.2f}x "
                      f"(length {b.best.depth}), after {a.best.speedup:.2f}x (length {a.best.depth})")


def wall_time(seconds: dict[str, float]) -> str:
    """'512 s (before 90, training 300, after 122)' from a Clock's laps."""
    parts = ", ".join(f"{part} {value:.0f}" for part, value in seconds.items() if part != "total")
    return f"{seconds['total']:.0f} s ({parts})"


def print_extend(result) -> None:
    """The end of `n3 extend`: what trained, then before and after: the loss by position bucket on held-out long
    documents, RULER per task and length, the short-context validation loss."""
    from stages.eval.lengths import length_label

    loop = result.loop
    table = Table(title=f"Long-context phase: {result.start} -> {result.run}", show_header=False, show_edge=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("context", f"{result.short_len:,} / {result.seq_len:,} tokens (short / long rows)")
    table.add_row("steps", f"{result.total_steps} ({result.short_steps} short)"
                  + (f" in {loop.seconds:.0f} s, {loop.tokens:,} tokens" if loop else " (done before)"))
    table.add_row("learning rate", f"{result.lr:g}, constant")
    table.add_row("long rows from", ", ".join(result.sources))
    table.add_row("wall time", wall_time(result.seconds))
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    before, after = result.before, result.after
    edges = before.positions.edges
    positions = Table("positions", "loss before", "loss after", title="Loss by position, held-out long documents "
                      "(nats/token)", show_edge=False)
    for i in range(len(edges) - 1):
        positions.add_row(f"{edges[i]:,}-{edges[i + 1]:,}", f"{before.positions.nll[i]:.3f}",
                          f"{after.positions.nll[i]:.3f}")
    short = result.short_len
    positions.add_row(f"past {short:,}", f"{before.positions.past(short):.3f}", f"{after.positions.past(short):.3f}")
    console.print(positions)
    lengths = sorted(next(iter(before.ruler.values())))
    ruler = Table("task", *(f"{length_label(n)} {w}" for n in lengths for w in ("before", "after")),
                  title="RULER (score x 100)", show_edge=False)
    for task in before.ruler:
        ruler.add_row(task, *(f"{m.ruler[task][n]:.1f}" for n in lengths for m in (before, after)))
    ruler.add_row("mean", *(f"{m.ruler_mean(n):.1f}" for n in lengths for m in (before, after)))
    console.print(ruler)
    if before.short_loss is not None and after.short_loss is not None:
        change = 100 * (after.short_loss / before.short_loss - 1)
        console.print(f"short-context validation loss ({short} tokens): before {before.short_loss:.4f}, after "
                      f"{after.short_loss:.4f} ({change:+.1f}%)")
    console.print(result.plot)
