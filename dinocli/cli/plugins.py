"""``dino plugins``: what is installed, what each plugin provides, and what failed."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from dinocli.cli.app import command
from dinocli.errors import DinoError
from dinocli.registry import KINDS, Registry, get_registry


@command(
    name="plugins",
    rich_help_panel="Inspect",
    short_help="Installed plugins and what each provides.",
    examples=("dino plugins", "dino plugins --json", "dino plugins --expand", "dino plugins --check"),
)
def plugins_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    expand: Annotated[
        bool,
        typer.Option(
            "--expand",
            help="Count the names behind each pattern such as timm/* (imports the libraries behind them); "
            "with --json, list them.",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Exit with code 1 when any plugin failed or was not loaded (for a plugin's CI)."),
    ] = False,
) -> None:
    """List installed plugins and the backbones, augmentations, strategies, recipes and loggers they provide."""
    registry = get_registry()
    infos = sorted(registry.plugins.values(), key=lambda i: (not i.builtin, i.name)) + registry.ignored
    expanded, unlisted = _pattern_names(registry) if expand else ({}, {})
    if as_json:
        rows = []
        for info in infos:
            row = asdict(info)
            provides = row.pop("provides")
            row.pop("builtin")
            if expand:
                mine = [p for names in provides.values() for p in names]
                row["pattern_names"] = {p: expanded[p] for p in mine if p in expanded}
                if errors := {p: unlisted[p] for p in mine if p in unlisted}:
                    row["pattern_errors"] = errors
            rows.append({**row, **provides})
        typer.echo(json.dumps({"plugins": rows}, indent=2))
        _exit_on_failure(check, infos)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    wide = console.width >= WIDE_TABLE_COLUMNS  # one column per kind; else what each provides in one cell
    table = Table(title="dinocli plugins")
    kinds = [KINDS[k][2] for k in KINDS]
    for col in ("plugin", "distribution", "version", *kinds, "status") if wide else ("plugin", "from", "provides", "status"):
        table.add_column(col, overflow="fold")
    for info in infos:
        status = "[green]ok[/green]" if info.error is None else (
            f"[red]{info.error}[/red]" if any(info is i for i in registry.ignored) else f"[red]failed: {info.error}[/red]"
        )
        provided = [", ".join(_shown(n, expanded, unlisted) for n in info.provides[k]) for k in KINDS]
        origin = info.distribution + (" (built-in)" if info.builtin else "")
        if wide:
            table.add_row(info.name, origin, info.version, *provided, status)
        else:
            lines = [f"{kind}: {names}" for kind, names in zip(kinds, provided) if names]
            table.add_row(info.name, f"{origin} {info.version}", "\n".join(lines), status)
    console.print(table)
    _exit_on_failure(check, infos)


def _exit_on_failure(check: bool, infos: list) -> None:
    failed = [info.name for info in infos if info.error]
    if check and failed:
        raise DinoError(f"{len(failed)} plugin(s) have problems: {', '.join(failed)}")


#: Terminal columns from which ``dino plugins`` shows one column per kind of plugin.
WIDE_TABLE_COLUMNS = 150


def _pattern_names(registry: Registry) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The names behind every registered pattern (``timm/*``), and why a pattern's plugin could not
    list them, by pattern: one plugin's failure leaves the others listed."""
    names, errors = {}, {}
    for family in (f for kind in KINDS for f in registry.families(kind)):
        try:
            names[family.pattern] = family.names()
        except DinoError as exc:
            errors[family.pattern] = str(exc)
    return names, errors


def _shown(name: str, expanded: dict[str, list[str]], unlisted: dict[str, str]) -> str:
    if name in unlisted:
        return f"{name} [red](cannot list its names: {unlisted[name]})[/red]"
    return f"{name} ({len(expanded[name])} names)" if name in expanded else name
