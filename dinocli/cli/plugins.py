"""``dino plugins``: what is installed, what each plugin provides, and what failed."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from dinocli.cli.app import command
from dinocli.registry import KINDS, get_registry


@command(
    name="plugins",
    rich_help_panel="Inspect",
    short_help="Installed plugins and what each provides.",
    examples=("dino plugins", "dino plugins --json"),
)
def plugins_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List installed plugins and the backbones, augmentations and strategies they provide."""
    registry = get_registry()
    infos = sorted(registry.plugins.values(), key=lambda i: (not i.builtin, i.name))
    if as_json:
        rows = []
        for info in infos:
            row = asdict(info)
            provides = row.pop("provides")
            row.pop("builtin")
            rows.append({**row, **provides})
        typer.echo(json.dumps({"plugins": rows}, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="dinocli plugins")
    for col in ("plugin", "distribution", "version", *(KINDS[k][2] for k in KINDS), "status"):
        table.add_column(col)
    for info in infos:
        status = f"[red]failed: {info.error}[/red]" if info.error else "[green]ok[/green]"
        table.add_row(
            info.name,
            info.distribution + (" (built-in)" if info.builtin else ""),
            info.version,
            *(", ".join(info.provides[k]) for k in KINDS),
            status,
        )
    Console().print(table)
