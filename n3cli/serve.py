"""`n3 serve`: an OpenAI-compatible HTTP server for a checkpoint (REFERENCE.md section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from n3cli.options import DEFAULT_PRESET, DryRun, Preset, Sets, load_preset

Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c",
        help="A checkpoint directory (n3 or Hugging Face NemotronH) or a run folder (its newest checkpoint is used). "
        "Default: the newest run under runs/.",
    ),
]


def run(
    checkpoint: Checkpoint = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 8000,
    preset: Preset = DEFAULT_PRESET,
    overrides: Sets = None,
    dry_run: DryRun = False,
) -> None:
    """Serve a checkpoint over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).

    A trainer swaps in new weights with POST /update_weights_from_disk (SGLang's route; GET /get_model_info says
    which version serves).

    The preset's serve table sizes the engine: batch, context, MTP speculation, SSM state dtype.
    Ctrl-C (or SIGTERM) stops accepting requests and finishes those in flight.
    """
    from model.checkpoint import newest_run
    from model.errors import UserError

    cfg = load_preset(preset, overrides)
    if checkpoint is None:
        checkpoint = newest_run("runs")
        if checkpoint is None:
            raise UserError(
                "no --checkpoint given and no run under runs/ has a checkpoint; train one with `n3 pretrain`, "
                "or pass --checkpoint DIR (an n3 or Hugging Face NemotronH checkpoint)"
            )
    from stages.serve import plan_serve, serve

    plan = plan_serve(checkpoint, cfg)
    if dry_run:
        from n3cli.report import print_serve_plan

        print_serve_plan(plan)
        return
    serve(plan, host, port)
