"""``dino report RUN``: plots of a training run's metrics (PNG) and an offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command


@command(
    name="report",
    rich_help_panel="Train",
    short_help="Charts of a run's metrics and an offline HTML page.",
    examples=("dino report runs/vits16",),
)
def report_command(
    run: Annotated[Path, typer.Argument(help="Run folder of 'dino pretrain' (holds metrics.jsonl).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder for the files \\[default: RUN/report].")
    ] = None,
) -> None:
    """Draw RUN/metrics.jsonl: loss, lr, momentum, teacher temperature, entropies, embedding spread,
    k-NN accuracy ... as PNG charts and a self-contained HTML page (index.html)."""
    from dinocli.report import render_report

    result = render_report(run, output)
    typer.echo(f"{len(result.images)} charts in {result.folder}\nopen {result.html}")
