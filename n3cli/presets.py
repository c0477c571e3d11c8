"""`n3 presets list` and `n3 presets show`: which presets exist, and every value one resolves to."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import presets
from n3cli.options import DEFAULT_PRESET, Sets, load_preset

app = typer.Typer(help="List hardware presets and model shapes, or show what a preset resolves to.")


@app.command("list")
def list_presets() -> None:
    """Hardware presets (with the shape each trains) and model shapes."""
    hardware = Table("preset", "shape", "nodes x GPUs", "description", title="Hardware presets (--preset NAME)")
    configs = sorted((presets.load(name) for name in presets.names()), key=lambda c: (c.parallel.world_size, c.name))
    for cfg in configs:
        hardware.add_row(cfg.name, cfg.shape, f"{cfg.parallel.nodes} x {cfg.parallel.gpus_per_node}", cfg.description)

    shapes = Table("shape", "hidden", "layers", "attention", "experts (top-k)", "latent", "MTP", title="Model shapes")
    for name, m in sorted(((n, presets.shape(n)) for n in presets.shapes()), key=lambda s: s[1].hidden_size):
        shapes.add_row(
            name,
            str(m.hidden_size),
            str(m.num_layers),
            str(m.main_pattern.count("*")),
            f"{m.n_routed_experts} ({m.num_experts_per_tok})",
            str(m.moe_latent_size or "-"),
            m.mtp_pattern or "-",
        )
    console = Console()
    console.print(hardware)
    console.print(shapes)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Preset name or path to a .toml file.")] = DEFAULT_PRESET,
    overrides: Sets = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print every value NAME resolves to (its shape, extends chain, own values and --set applied).

    The TOML printed is itself a preset file: save it, edit it, pass it to --preset.
    """
    values = presets.as_dict(load_preset(name, overrides))
    print(json.dumps(values, indent=2) if as_json else to_toml(values))


def to_toml(values: dict) -> str:
    """Resolved values as TOML. `name` is not a preset key (a preset is named after its file), so it heads a comment."""
    lines = [f"# {values['name']}, fully resolved"]
    lines += [f"{key} = {_toml_value(v)}" for key, v in values.items() if key != "name" and not isinstance(v, dict)]
    lines += _tables(values, "")
    return "\n".join(lines)


def _tables(values: dict, prefix: str) -> list[str]:
    """Each table's plain keys under its [header], then its own tables ([sft], then [sft.train])."""
    lines = []
    for table, entries in values.items():
        if isinstance(entries, dict):
            lines += ["", f"[{prefix}{table}]"]
            lines += [f"{key} = {_toml_value(v)}" for key, v in entries.items() if not isinstance(v, dict)]
            lines += _tables(entries, f"{prefix}{table}.")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value, ensure_ascii=False)  # JSON strings and string lists are valid TOML
    return repr(value)  # ints and floats: Python's repr is valid TOML (1e-05, 2.5)
