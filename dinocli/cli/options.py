"""Options that several commands share, declared once (``Annotated`` aliases for Typer)."""

from __future__ import annotations

from typing import Annotated

import typer


def complete_backbone(incomplete: str) -> list[str]:
    """Shell completion of backbone names, ``timm/...`` and other patterns' names included."""
    from dinocli.errors import DinoError
    from dinocli.registry import get_registry

    try:
        return get_registry().completions("backbones", incomplete)
    except DinoError:  # a plugin that cannot list its names completes nothing
        return []


CheckpointKey = Annotated[
    str,
    typer.Option(
        "--checkpoint-key", help="Which network of a training checkpoint: teacher or student.", rich_help_panel="Model"
    ),
]

Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Backbone name, where the file does not say it.",
        rich_help_panel="Model",
        autocompletion=complete_backbone,
    ),
]
PatchSize = Annotated[
    int | None,
    typer.Option("--patch-size", help="ViT patch size, where the file does not say it.", rich_help_panel="Model"),
]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 on GPUs and CPUs with native bf16, else fp32), fp32, bf16 or fp16 (CUDA).",
        rich_help_panel="Performance",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Performance")]
