"""`n3 eval`: RULER, perplexity, throughput, MTP acceptance and lm-evaluation-harness (REFERENCE.md section 6).

Each command evaluates a checkpoint in-process (`--checkpoint`, engine sized by the preset's [serve] table) or an
OpenAI-compatible server (`--endpoint URL --tokenizer PATH`), prints a table and writes JSON under --out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from n3cli.options import DEFAULT_PRESET, Checkpoint, Out, Preset, Sets, load_preset

console = Console()

app = typer.Typer(
    help="Evaluate a checkpoint or an OpenAI-compatible endpoint: the built-in tasks, RULER, perplexity, throughput, "
    "MTP acceptance, lm-evaluation-harness.",
    no_args_is_help=True,
)

Endpoint = Annotated[
    str | None,
    typer.Option("--endpoint", help="Base URL of an OpenAI-compatible server (n3 serve, vLLM), e.g. "
                 "http://127.0.0.1:8000; requests go to /v1/completions as token ids."),
]
TokenizerPath = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="With --endpoint: the served model's tokenizer.json or a folder holding one "
                 "(for an n3 server, its checkpoint)."),
]
ModelName = Annotated[str | None, typer.Option("--model", help="With --endpoint: the served model (default: the "
                                                                "first /v1/models lists).")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="With --endpoint: requests in flight.")]
Seed = Annotated[int, typer.Option("--seed", help="Seeds everything random in the evaluation.")]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _open_backend(checkpoint: Path | None, endpoint: str | None, tokenizer: Path | None, model: str | None,
                  concurrency: int, preset: str, overrides: list[str] | None, **engine: int | bool | None):
    """The evaluation backend the options name: an endpoint, or a checkpoint loaded in-process."""
    from model.checkpoint import newest_run
    from model.errors import UserError
    from stages.rollout.backend import engine_backend
    from stages.rollout.client import EndpointBackend

    cfg = load_preset(preset, overrides)
    if checkpoint is not None and endpoint is not None:
        raise UserError("give --checkpoint or --endpoint, not both")
    if endpoint is not None:
        return EndpointBackend(endpoint, tokenizer, model, concurrency)
    if checkpoint is None:
        checkpoint = newest_run("runs")
        if checkpoint is None:
            raise UserError("give --checkpoint DIR or --endpoint URL (no run under runs/ has a checkpoint)")
    with console.status(f"loading {checkpoint}"):
        return engine_backend(checkpoint, cfg, lambda warning: console.print(f"warning: {warning}"), **engine)


def _out_dir(out: Path | None, kind: str) -> Path:
    return out if out is not None else Path("runs") / "eval" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A transient progress bar; the callback advances it by n (and sets the total when a stage knows it later)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        yield advance


def _saved(*paths: Path | None) -> None:
    console.print("results: " + ", ".join(str(p) for p in paths if p is not None))


# --- ruler ----------------------------------------------------------------------------------------------------------
@app.command("ruler")
def ruler(
    checkpoint: Checkpoint = None,
    endpoint: Endpoint = None,
    tokenizer: TokenizerPath = None,
    model: ModelName = None,
    lengths: Annotated[str | None, typer.Option(help="Target lengths in the model's tokens (prompt + answer), e.g. "
                                                     "4k,8k,128k. Default: 4k..128k on a GPU, 1k,2k on CPU.")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Samples per task and length. Default: 500 (RULER's) on "
                                                            "a GPU, 5 on CPU.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated subset of the 13 tasks (default: all).")] = None,
    haystack: Annotated[Path | None, typer.Option(help="A folder of .txt files for the essay haystacks (default: "
                                                       "the built-in corpus, Python's language reference).")] = None,
    squad: Annotated[Path | None, typer.Option(help="SQuAD v2.0 dev JSON for qa_1 (skipped without it).")] = None,
    hotpotqa: Annotated[Path | None, typer.Option(help="HotpotQA dev (distractor) JSON for qa_2 (skipped without "
                                                       "it).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap prompts in the Nemotron chat template, reasoning off "
                                                      "(for chat-tuned models).")] = False,
    seed: Seed = 42,
    concurrency: Concurrency = 8,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """RULER: 13 synthetic long-context tasks (needles, variable tracking, word extraction, QA) at each length;
    greedy answers scored by string matching. Writes ruler.json, predictions.jsonl and ruler.png."""
    from stages.eval.lengths import length_label, parse_lengths
    from stages.eval.report import plot_ruler, write_json, write_jsonl
    from stages.eval.ruler import TASKS, RulerOptions, run_ruler

    cuda = _cuda()
    targets = parse_lengths(lengths or ("4k,8k,16k,32k,64k,128k" if cuda else "1k,2k"))
    count = samples or (500 if cuda else 5)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(TASKS)
    options = RulerOptions(targets, count, names, seed, haystack, squad, hotpotqa, chat)
    backend = _open_backend(checkpoint, endpoint, tokenizer, model, concurrency, preset, overrides,
                            max_len=max(targets))
    console.print(f"model: {backend.description}\nsamples: {count} per task and length"
                  + ("" if samples or cuda else " (the CPU default; RULER uses 500)"))
    runnable = [t for t in names if options.skip_reason(t) is None]
    with _progress("RULER", count * len(runnable) * len(targets)) as advance:
        result = run_ruler(backend, options, advance)

    table = Table("task", *(length_label(n) for n in targets), title="RULER (score x 100)")
    for task in names:
        if task in result.scores:
            table.add_row(task, *(f"{result.scores[task][n]:.1f}" for n in targets))
        else:
            table.add_row(task, *(["skipped"] * len(targets)), style="dim")
    table.add_section()
    table.add_row(f"mean ({len(result.scores)} tasks)", *(f"{result.mean(n):.1f}" for n in targets), style="bold")
    console.print(table)
    for task, reason in result.skipped.items():
        console.print(f"skipped {task}: {reason}")
    for task, length, tokens in result.short():
        console.print(f"note: {task} at {length_label(length)} holds {tokens:,.0f} tokens per sample (its source ran "
                      "out of filler)")
    if result.haystack:
        console.print(f"essay haystack: {result.haystack}")
    folder = _out_dir(out, "ruler")
    plot = plot_ruler(result, folder / "ruler.png")
    if plot is None:
        console.print("no plot: matplotlib is not installed (pip install 'n3[eval]')")
    _saved(write_json(folder / "ruler.json", result.summary()),
           write_jsonl(folder / "predictions.jsonl", result.predictions), plot)


# --- tasks ----------------------------------------------------------------------------------------------------------
@app.command("tasks")
def tasks(
    checkpoint: Checkpoint = None,
    endpoint: Endpoint = None,
    tokenizer: TokenizerPath = None,
    model: ModelName = None,
    domains: Annotated[str | None, typer.Option("--tasks", help="Comma-separated domains, each DOMAIN or "
                                                "DOMAIN:LEVELS (e.g. math:1-2,code). Default: the preset's sft.tasks.")
                       ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Held-out problems per domain. Default: the preset's "
                                                "sft.eval_problems.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Tokens per reply, reasoning included. Default: the "
                                                   "preset's sft.eval_max_tokens.")] = None,
    reasoning: Annotated[str, typer.Option(help="Reasoning modes to run: on, off, or on,off.")] = "on,off",
    seed: Seed = 0,
    concurrency: Concurrency = 8,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """The built-in verifiable tasks (math, code, instructions): held-out accuracy per domain, greedy, with reasoning
    on and off, and the mean reply length. Writes tasks.json and predictions.jsonl."""
    from model.errors import UserError
    from n3cli.report import print_tasks
    from stages.envs.suite import MODES, evaluate_suite, parse_suite, suite_problems
    from stages.eval.report import write_json, write_jsonl

    cfg = load_preset(preset, overrides)
    modes = tuple(m.strip() for m in reasoning.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"--reasoning {reasoning!r}: give on, off or on,off")
    suite = parse_suite(domains.split(",") if domains else cfg.sft.tasks)
    problems = suite_problems(suite, "test", samples or cfg.sft.eval_problems, seed)
    backend = _open_backend(checkpoint, endpoint, tokenizer, model, concurrency, preset, overrides)
    console.print(f"model: {backend.description}")
    with _progress("tasks", len(modes) * sum(map(len, problems.values()))) as advance:
        result = evaluate_suite(backend, problems, max_tokens or cfg.sft.eval_max_tokens, modes, advance)
    print_tasks(result)
    folder = _out_dir(out, "tasks")
    _saved(write_json(folder / "tasks.json", result.summary() | {"suite": suite, "seed": seed}),
           write_jsonl(folder / "predictions.jsonl", result.predictions))


# --- perplexity -----------------------------------------------------------------------------------------------------
@app.command("perplexity")
def perplexity(
    text: Annotated[Path | None, typer.Option(help="A UTF-8 text file, scored as one document.")] = None,
    data: Annotated[Path | None, typer.Option(help="A corpus prepared by `n3 data`: its validation split.")] = None,
    checkpoint: Checkpoint = None,
    endpoint: Endpoint = None,
    tokenizer: TokenizerPath = None,
    model: ModelName = None,
    window: Annotated[int | None, typer.Option(min=2, help="Tokens per scoring window (default: the model's "
                                                           "context, else 2048).")] = None,
    stride: Annotated[int | None, typer.Option(min=1, help="Tokens scored per window after the first (default: "
                                                           "window - 1; smaller gives more context).")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=2, help="Score at most this many tokens.")] = None,
    concurrency: Concurrency = 8,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """Perplexity (and bits per byte, for a text file) of a text file or a prepared corpus's validation split."""
    from model.errors import UserError
    from stages.eval import perplexity as ppl
    from stages.eval.report import write_json

    if (text is None) == (data is None):
        raise UserError("give --text FILE or --data DIR (a corpus prepared by `n3 data`)")
    backend = _open_backend(checkpoint, endpoint, tokenizer, model, concurrency, preset, overrides,
                            max_len=window + 1 if window else None, compile=False)  # scoring never decodes
    tokens = (ppl.text_tokens(backend, text, max_tokens) if text is not None
              else ppl.validation_tokens(data, backend.tokenizer, max_tokens))
    with _progress("scoring windows", None) as advance:
        result = ppl.perplexity(backend, tokens, window, stride, advance)
    table = Table("", "", title="Perplexity", show_header=False)
    table.add_row("source", result.source)
    table.add_row("model", result.backend)
    table.add_row("tokens scored", f"{result.scored:,} in {result.windows} window(s) of {result.window}, stride "
                                   f"{result.stride}")
    table.add_row("loss (nats/token)", f"{result.nll:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.4f}")
    if result.bits_per_byte is not None:
        table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
    console.print(table)
    _saved(write_json(_out_dir(out, "perplexity") / "perplexity.json", result.summary()))


# --- throughput -----------------------------------------------------------------------------------------------------
@app.command("throughput")
def throughput(
    checkpoint: Checkpoint = None,
    endpoint: Endpoint = None,
    tokenizer: TokenizerPath = None,
    model: ModelName = None,
    shapes: Annotated[str | None, typer.Option(help="INPUT:OUTPUT token pairs, e.g. 8k:64k,50k:2k. Default: the "
                                                    "report's 8k:64k and 50k:2k divided by --scale.")] = None,
    scale: Annotated[int | None, typer.Option(min=1, help="Divide the report's shapes by this (default: 1 on a GPU, "
                                                          "64 on CPU).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    requests: Annotated[int | None, typer.Option(min=1, help="Requests per shape (default: 2 x concurrency).")] = None,
    seed: Seed = 0,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """Serving speed: time to first token, time per output token, inter-token latency, tokens/s, per shape."""
    from stages.eval.lengths import parse_length
    from stages.eval.report import write_json
    from stages.eval.throughput import Shape, measure, report_shapes

    if shapes:
        try:
            pairs = [s.split(":") for s in shapes.split(",") if s.strip()]
            chosen = [Shape(parse_length(i), parse_length(o)) for i, o in pairs]
        except ValueError:
            from model.errors import UserError

            raise UserError(f"--shapes {shapes!r}: give INPUT:OUTPUT pairs, e.g. 8k:64k,50k:2k") from None
    else:
        chosen = report_shapes(scale or (1 if _cuda() else 64))
    longest = max(s.input_len + s.output_len for s in chosen)
    backend = _open_backend(checkpoint, endpoint, tokenizer, model, concurrency, preset, overrides,
                            max_len=longest, max_batch=concurrency)
    console.print(f"model: {backend.description}")
    results = []
    for shape in chosen:
        with console.status(f"shape {shape.label}: {requests or 2 * concurrency} requests, {concurrency} at a time"):
            results.append(measure(backend, shape, concurrency, requests or 2 * concurrency, seed).summary())
    table = Table("input/output", "requests", "output tok/s", "total tok/s", "TTFT mean", "TTFT p99", "TPOT mean",
                  "ITL mean", "ITL p99", title=f"Throughput ({concurrency} concurrent; times in ms)")
    for r in results:
        table.add_row(f"{r['input_len']}/{r['output_len']}", str(r["requests"]), f"{r['output_tokens_per_s']:.1f}",
                      f"{r['total_tokens_per_s']:.1f}", *(_ms(r[k][s]) for k, s in [
                          ("ttft", "mean_ms"), ("ttft", "p99_ms"), ("tpot", "mean_ms"), ("itl", "mean_ms"),
                          ("itl", "p99_ms")]))
    console.print(table)
    summary = {"benchmark": "throughput", "backend": backend.description, "results": results}
    _saved(write_json(_out_dir(out, "throughput") / "throughput.json", summary))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- mtp ------------------------------------------------------------------------------------------------------------
@app.command("mtp")
def mtp(
    checkpoint: Checkpoint = None,
    text: Annotated[Path | None, typer.Option(help="A UTF-8 text file to take prompts from (default: the built-in "
                                                   "corpus).")] = None,
    data: Annotated[Path | None, typer.Option(help="A corpus prepared by `n3 data`: prompts from its validation "
                                                   "split.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="ENV", help="Chat prompts instead: an "
                   "environment's held-out prompts (as `n3 rlvr --env`), in the checkpoint's chat template. "
                   "Repeatable.")] = None,
    depth: Annotated[int, typer.Option(min=1, help="The deepest draft: every depth from 1 to it is measured.")] = 3,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts, at evenly spaced places in the text.")] = 16,
    prompt_len: Annotated[int, typer.Option(min=2, help="Tokens per prompt (with --env: the longest kept).")] = 128,
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per prompt.")] = 128,
    temperature: Annotated[list[float] | None, typer.Option(min=0, help="0 is greedy; otherwise rejection "
                                                              "sampling. Repeatable (default: 0 and 1).")] = None,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """MTP self-speculation: acceptance length, per-position acceptance and decode speedup per draft length, greedy
    and at temperature 1 (in-process only: an endpoint does not report acceptance per request)."""
    from model.errors import UserError
    from n3cli.report import print_acceptance
    from stages.eval import mtp as acceptance
    from stages.eval.corpus import builtin_corpus
    from stages.eval.perplexity import read_text, validation_tokens
    from stages.eval.report import write_json

    if sum(x is not None for x in (text, data, env)) > 1:
        raise UserError("give one of --text FILE, --data DIR and --env ENV")
    backend = _open_backend(checkpoint, None, None, None, 1, preset, overrides, max_len=prompt_len + max_tokens,
                            speculative_tokens=depth)
    if env is not None:
        batch = _chat_prompts(backend.tokenizer, env, prompts, prompt_len)
        source = f"held-out prompts of {', '.join(env)}"
    else:
        if data is not None:
            ids, source = validation_tokens(data, backend.tokenizer).ids, f"{data} (validation split)"
        elif text is not None:
            ids, source = backend.tokenizer.encode(read_text(text)), str(text)
        else:
            corpus = builtin_corpus()
            ids, source = backend.tokenizer.encode(corpus.text), corpus.description
        batch = acceptance.text_prompts(ids, backend.encode(""), prompts, prompt_len)
    console.print(f"model: {backend.description}\ntext: {source}")
    results = []
    for t in temperature or [0.0, 1.0]:
        with console.status(f"generating {max_tokens} tokens from {prompts} prompts at temperature {t:g}, "
                            f"without drafts and at draft lengths 1..{depth}"):
            results.append(acceptance.acceptance(backend, batch, max_tokens, source, t))
        print_acceptance(results[-1], f"MTP acceptance at temperature {t:g} ({prompts} prompts x {max_tokens} "
                                      "tokens)")
    _saved(write_json(_out_dir(out, "mtp") / "mtp.json", {"runs": [r.summary() for r in results]}))


def _chat_prompts(tokenizer, env: list[str], count: int, longest: int) -> list[list[int]]:
    """`count` held-out prompts of the environments in the chat template, those of at most `longest` tokens."""
    from model.errors import UserError
    from stages.envs.environments import blend_prompts, load_environments

    rendered = [tokenizer.encode_chat(p.messages) for p in blend_prompts(load_environments(env), [], count, "test", 0)]
    kept = [ids for ids in rendered if len(ids) <= longest]
    if not kept:
        raise UserError(f"none of the {len(rendered)} prompts fits --prompt-len {longest}; raise it")
    return kept


# --- lm-eval --------------------------------------------------------------------------------------------------------
@app.command("lm-eval")
def lm_eval(
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task (or group) names.")],
    checkpoint: Checkpoint = None,
    endpoint: Endpoint = None,
    tokenizer: TokenizerPath = None,
    model: ModelName = None,
    include_path: Annotated[Path | None, typer.Option(help="A folder of task YAML files (local tasks).")] = None,
    limit: Annotated[float | None, typer.Option(help="Documents per task (a fraction if below 1).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="Few-shot examples per prompt.")] = None,
    max_length: Annotated[int | None, typer.Option(min=2, help="Context tokens per request (default: the model's "
                                                               "context, else 2048).")] = None,
    seed: Seed = 0,
    concurrency: Concurrency = 8,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    out: Out = None,
) -> None:
    """lm-evaluation-harness tasks (needs the eval extra), through the engine or an endpoint."""
    from stages.eval.lm_eval_model import run_lm_eval
    from stages.eval.report import write_json

    backend = _open_backend(checkpoint, endpoint, tokenizer, model, concurrency, preset, overrides,
                            max_len=max_length + 1 if max_length else None)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    with console.status(f"lm-eval: {', '.join(names)}"):
        results = run_lm_eval(backend, names, include_path, limit, num_fewshot, max_length, seed)
    table = Table("task", "metric", "value", "stderr", title="lm-evaluation-harness")
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            table.add_row(task, metric + (f" ({filt})" if filt and filt != "none" else ""), f"{value:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-")
    console.print(table)
    summary = {"benchmark": "lm-eval", "backend": backend.description,
               **{k: results.get(k) for k in ("results", "groups", "versions", "n-shot", "n-samples")}}
    _saved(write_json(_out_dir(out, "lm-eval") / "lm_eval.json", summary))
