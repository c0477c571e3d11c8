"""`n3 quantize`: post-training quantization to a bits-per-element budget (REFERENCE.md section 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from n3cli.options import DEFAULT_PRESET, DryRun, Out, Preset, Sets, load_preset

FOUR_OVER_SIX = ("mse", "mae", "off")


def run(
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", "-c", help="Checkpoint directory or run folder (n3 or Hugging Face NemotronH).")] = None,
    bpe: Annotated[float | None, typer.Option(
        "--bpe", help="Budget: stored bits / all parameters (NVFP4 4.5, FP8 8, BF16 16). Nemotron 3 Ultra ships 5.03.")
    ] = None,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="A fixed recipe instead of the search: nemotron (routed experts NVFP4, shared experts and "
                         "Mamba projections FP8, the rest BF16).")] = None,
    out: Out = None,
    dry_run: DryRun = False,
    model: Annotated[str | None, typer.Option(
        "--model", help="With --dry-run: plan a model shape (tiny, small, nano, super, ultra) instead of a checkpoint.")
    ] = None,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    calib: Annotated[Path | None, typer.Option(
        "--calib", help="UTF-8 text to calibrate and evaluate on (default: the Python standard library's sources).")
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Tokens for calibration and sensitivity scores.", min=1)] = 8192,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity and KL.", min=1)] = 8192,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration / evaluation sequence.", min=2)] = 256,
    four_over_six: Annotated[str, typer.Option(
        help="Routed experts' NVFP4 scale choice per block: mse, mae, or off (max scaling).")] = "mse",
) -> None:
    """Quantize a checkpoint to NVFP4 / FP8 / BF16 per layer within --bpe (or --recipe nemotron), export it in the
    modelopt Hugging Face format (vLLM, TensorRT-LLM, n3 serve), and report its size and quality."""
    from model.errors import UserError

    if four_over_six not in FOUR_OVER_SIX:
        raise UserError(f"--four-over-six must be one of {', '.join(FOUR_OVER_SIX)}, got {four_over_six!r}")
    if dry_run:
        from stages.quantize import checkpoint_config
        from stages.quantize import dry_run as plan_only

        if checkpoint is not None:
            cfg = checkpoint_config(checkpoint)
        elif model is not None:
            import presets

            cfg = presets.shape(model)
        else:
            cfg = load_preset(preset, overrides).model
        print_result(plan_only(cfg, bpe, recipe))
        return
    if model is not None:
        raise UserError("--model plans a shape on the meta device; use it with --dry-run, or pass --checkpoint")
    if checkpoint is None or out is None:
        raise UserError("n3 quantize needs --checkpoint DIR and --out DIR (or --dry-run to see a plan)")
    from stages.quantize import quantize

    console = Console(stderr=True)
    with console.status("quantizing") as status:
        result = quantize(
            checkpoint, out, bpe, recipe, calib, calib_tokens, eval_tokens, seq_len,
            four_over_six=None if four_over_six == "off" else four_over_six,
            progress=lambda message: status.update(message),
        )
    print_result(result)


def print_result(result) -> None:
    from n3cli.report import human  # imports torch: not at module level, so `n3 --help` stays fast

    plan = result.plan
    console = Console()
    table = Table(title=f"Quantization plan ({result.method})", show_edge=False)
    for column in ("group", "format", "parameters", "size", "bits/param"):
        table.add_column(column, justify="left" if column in ("group", "format") else "right")
    for group, formats, params, bits in plan.groups():
        table.add_row(group, formats, human(params), human(bits / 8, "B"), f"{bits / params:.2f}" if params else "-")
    console.print(table)
    bf16 = plan.with_formats(lambda unit: "bf16").bits
    budget = f" (budget {result.budget})" if result.budget is not None else ""
    console.print(f"achieved [bold]{plan.bpe:.4f}[/] bits per element{budget}: {human(plan.bits / 8, 'B')} "
                  f"vs {human(bf16 / 8, 'B')} in BF16, {human(plan.total_params)} parameters")
    if result.quality is not None:
        q = result.quality
        console.print(f"held-out ({q.tokens} tokens): perplexity {q.perplexity:.4g} vs {q.reference_perplexity:.4g} "
                      f"unquantized; KL(unquantized || quantized) {q.kl:.4g} nats/token")
    if result.out is not None:
        console.print(f"wrote {result.out} (modelopt Hugging Face format; report in quantization_report.json)")
