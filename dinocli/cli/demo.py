"""``dino demo``: pretrain, extract, k-NN and attention maps on built-in data, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command


@command(
    name="demo",
    rich_help_panel="Train",
    short_help="The whole pipeline on built-in data, in a few minutes on a CPU.",
    examples=("dino demo", "dino demo --output dino-demo --epochs 8"),
)
def demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's files.")] = Path(
        "dino-demo"
    ),
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Pretraining epochs (default: the demo recipe's).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress display.")] = True,
) -> None:
    """Run the whole pipeline on built-in data: pretrain a small ViT, compare k-NN accuracy with random
    initialisation, and draw attention maps."""
    from dinocli.demo import run_demo

    report = run_demo(output, epochs=epochs, progress=progress, log=typer.echo)
    gain = report.knn_trained - report.knn_random
    typer.echo(
        f"\ndone in {report.seconds / 60:.1f} min. k-NN top-1 on the held-out images: "
        f"{report.knn_trained:.1f} % after DINO pretraining, {report.knn_random:.1f} % at random "
        f"initialisation ({gain:+.1f} points); linear probe {report.linear_trained:.1f} % against "
        f"{report.linear_random:.1f} %\n"
        f"  checkpoint:     {report.pretrain.checkpoint}\n"
        f"  metrics:        {report.output / 'run' / 'metrics.jsonl'}\n"
        f"  features:       {report.output / 'features'}\n"
        + (f"  attention maps: {report.attention_index}\n" if report.attention_index else "")
        + f"next: dino export --weights {report.pretrain.checkpoint} --output demo-vit.safetensors"
    )
