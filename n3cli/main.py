"""`n3`: the root command, the table of subcommands, and the one place bad input becomes a one-line error.

A UserError or a usage error (unknown flag, bad option value) prints `error: <message>` on stderr and exits 2;
`--debug` anywhere on the line, or N3_DEBUG=1, prints the traceback instead. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated

import typer

from model.errors import UserError
from n3cli import __version__, data, extend, mopd, mtp_boost, presets, pretrain, quantize, recipe, rlvr, serve, sft
from n3cli import eval as evaluation
from n3cli.options import Debug

# Subcommand -> a plain function (one command) or a Typer app (a group such as `presets`). A new subcommand is a
# module in n3cli/ plus one line here. Command modules import their stage inside the function, so `n3 --help` and
# `n3 presets` stay fast.
COMMANDS: dict[str, Callable | typer.Typer] = {
    "data": data.run,
    "presets": presets.app,
    "pretrain": pretrain.run,
    "extend": extend.run,
    "sft": sft.run,
    "rlvr": rlvr.app,
    "mopd": mopd.run,
    "mtp-boost": mtp_boost.run,
    "quantize": quantize.run,
    "serve": serve.run,
    "eval": evaluation.app,
    "recipe": recipe.run,
}

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _name, _target in COMMANDS.items():
    if isinstance(_target, typer.Typer):
        app.add_typer(_target, name=_name)
    else:
        app.command(_name)(_target)


def _print_version(value: bool) -> None:
    if value:
        print(f"n3 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Debug = False,  # declared so it parses and shows in --help; main() reads it before parsing
) -> None:
    """n3: the Nemotron 3 recipe (hybrid Mamba-2 / attention / LatentMoE) from data to serving."""


def main(argv: list[str] | None = None) -> None:
    """Run `n3` with `argv` (default: the command line) and exit with its status."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    debug = "--debug" in args or os.environ.get("N3_DEBUG", "") not in ("", "0")
    if "--debug" in args:  # accepted anywhere: move it to the root command, which declares it
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        status = app(args=args, prog_name="n3", standalone_mode=False)
    except (UserError, typer.TyperException) as e:  # TyperException: Typer's usage errors (bad flag, bad value)
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        status = 2
    except typer.Abort:  # end of input at a prompt
        print("aborted", file=sys.stderr)
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


def _one_line(e: Exception) -> str:
    if isinstance(e, typer.TyperException):
        message = e.format_message()
        if ctx := getattr(e, "ctx", None):  # usage errors know the command they belong to
            message += f" (see '{ctx.command_path} --help')"
    else:
        message = str(e)
    return " ".join(message.split())
