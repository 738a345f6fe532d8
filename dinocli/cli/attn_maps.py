"""``dino attn-maps``: last-block self-attention maps, masks and overlays of any images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command
from dinocli.cli.options import Arch, CheckpointKey, Device, PatchSize
from dinocli.data import find_images
from dinocli.errors import UsageError


@command(
    name="attn-maps",
    rich_help_panel="Inspect",
    short_help="What each attention head of a ViT looks at: maps, masks, overlays, an index page.",
    examples=(
        "dino attn-maps --weights runs/vits16/checkpoint.pth photo.jpg --output attn",
        "dino attn-maps --weights vits16.safetensors photos/ --threshold 0.6 --output attn",
    ),
)
def attn_maps_command(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files and/or folders (searched recursively).",
            metavar="IMAGE_OR_DIR",
            show_default=False,
        ),
    ],
    weights: Annotated[
        Path, typer.Option("--weights", "-w", help="Checkpoint, reference .pth, safetensors file or Hugging Face folder.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the pictures to.")],
    checkpoint_key: CheckpointKey = "teacher",
    arch: Arch = None,
    patch_size: PatchSize = None,
    image_size: Annotated[
        str,
        typer.Option(
            "--image-size",
            help="Resize to N x N, or H W ('480 640' or 480x640); with --keep-aspect, the short side.",
        ),
    ] = "480",
    keep_aspect: Annotated[
        bool, typer.Option("--keep-aspect", help="Keep the aspect ratio: --image-size is the short side.")
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", "-t", help="Also write masks holding this fraction of each head's attention (e.g. 0.6)."
        ),
    ] = None,
    heads: Annotated[
        str | None, typer.Option("--heads", help="Comma-separated heads to show, e.g. 0,2,5 (default: all).")
    ] = None,
    colormap: Annotated[
        str, typer.Option("--colormap", help="viridis, inferno, magma or gray.")
    ] = "viridis",
    upsample_mode: Annotated[
        str, typer.Option("--upsample", help="Upsampling of the maps to the image: nearest or bilinear.")
    ] = "nearest",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 4,
    device: Device = "auto",
) -> None:
    """Show what each attention head of a ViT looks at: maps, masks, overlays and an index page."""
    from dinocli.io import check_output_path
    from dinocli.visualize import load_attention_backbone, resolve_size, write_attention_pages
    from dinocli.visualize.attention_pages import check_page_options

    size = resolve_size(parse_image_size(image_size), keep_aspect)
    check_page_options(colormap, upsample_mode, threshold, batch_size)
    chosen_heads = parse_heads(heads) if heads is not None else None
    paths = collect_images(images)
    check_output_path(output, "--output", folder=True)  # before the model is read
    model = load_attention_backbone(weights, arch, patch_size, checkpoint_key)
    from dinocli.runtime import resolve_device

    model.to(resolve_device(device))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("attention maps"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # a log gets no progress bar, nor the blank line it leaves
    ) as progress:
        task = progress.add_task("images", total=len(paths))
        report = write_attention_pages(
            model,
            paths,
            output,
            image_size=size,
            heads=chosen_heads,
            threshold=threshold,
            colormap=colormap,
            upsample_mode=upsample_mode,
            batch_size=batch_size,
            on_image=lambda _: progress.advance(task),
        )
    typer.echo(f"wrote attention maps of {len(report.images)} image(s) to {output}; open {report.index}")


def parse_image_size(text: str) -> list[int]:
    """``"480"`` -> ``[480]``; ``"480 640"``, ``"480x640"`` or ``"480,640"`` -> ``[480, 640]``."""
    match = re.fullmatch(r"\s*(\d+)(?:(?:\s*[x,]\s*|\s+)(\d+))?\s*", text.lower())
    if not match:
        raise UsageError(f"--image-size {text!r}: give one number (N x N) or two (H W), e.g. 480 or 480x640")
    return [int(p) for p in match.groups() if p is not None]


def parse_heads(text: str) -> list[int]:
    """``"0,2,5"`` -> ``[0, 2, 5]``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--heads {text!r}: give head numbers separated by commas, e.g. 0,2,5")
    return [int(p) for p in parts]


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to every image under them; duplicates dropped."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += find_images(item)
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"image or folder not found: {item}")
    return list(dict.fromkeys(found))
