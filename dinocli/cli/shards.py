"""``dino shards``: write an image folder to WebDataset-style tar shards, usable as ``--data``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command


@command(
    name="shards",
    rich_help_panel="Train",
    short_help="Write an image folder to tar shards (WebDataset layout), usable as --data.",
    examples=(
        "dino shards --data DIR/train --output 'shards/train-%06d.tar'",
        "dino shards --data DIR/train --output 'shards/train-%06d.tar' --max-count 5000",
    ),
)
def shards_command(
    data: Annotated[Path, typer.Option("--data", "-d", help="Image folder (searched recursively).")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Shard names with a number field, e.g. 'out/train-%06d.tar'.")
    ],
    max_count: Annotated[int, typer.Option("--max-count", help="Images per shard.")] = 10_000,
) -> None:
    """Write the images under a folder to uncompressed tar shards, in the order training reads them:
    --data on the shards then trains and extracts exactly as on the folder (labels from the class
    folders, kept in the member names)."""
    from dinocli.data.shards import brace_pattern, leftover_shards, write_shards

    written = write_shards(data, output, max_count=max_count)
    typer.echo(f"wrote {len(written)} shard(s); read them with --data '{brace_pattern(output, len(written))}'")
    if left := leftover_shards(output, len(written)):
        typer.echo(
            f"warning: {len(left)} older shard(s) of this pattern remain from an earlier run ({left[0]}"
            f"{' ...' if len(left) > 1 else ''}); --data on their folder would read them too: delete them",
            err=True,
        )
