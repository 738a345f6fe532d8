"""Options that several commands share, declared once (``Annotated`` aliases for Typer)."""

from __future__ import annotations

import inspect
from dataclasses import MISSING
from typing import Annotated, Any, Optional

import typer


def complete_backbone(incomplete: str) -> list[str]:
    """Shell completion of backbone names, ``timm/...`` and other patterns' names included."""
    from dinocli.errors import DinoError
    from dinocli.registry import get_registry

    try:
        return get_registry().completions("backbones", incomplete)
    except DinoError:  # a plugin that cannot list its names completes nothing
        return []


def pretrain_option(name: str) -> inspect.Parameter:
    """The ``dino pretrain`` option of config field ``name`` (default ``None``: the config decides),
    as a keyword parameter for a command's signature."""
    from dinocli.train.config import FIELDS

    f = FIELDS[name]
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    flag = name.replace("_", "-")
    decls = [f"--{flag}/--no-{flag}"] if isinstance(default, bool) else [f"--{flag}"]
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f.metadata["help"] + (f" \\[default: {shown}]" if shown != "" else "")
    kind: Any = tuple[float, float] if isinstance(default, tuple) else type(default)
    option = typer.Option(
        *decls,
        help=help_text,
        rich_help_panel=f.metadata["panel"],
        show_default=False,
        autocompletion=complete_backbone if name == "arch" else None,
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]
    )


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
