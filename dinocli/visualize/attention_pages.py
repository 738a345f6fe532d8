"""Attention pages: per-image PNGs, masks, overlays, a contact sheet and raw maps, plus an index page.

Layout under the output folder::

    index.html                       every image's grid.png on one offline page
    <image stem>/image.png           the resized, cropped photo the model saw
    <image stem>/attn-head{j}.png    head j's map in a colour map
    <image stem>/attn-mean.png       the mean of the shown heads' maps
    <image stem>/mask-th{T}-head{j}.png, overlay-head{j}.png   with a threshold T
    <image stem>/grid.png            photo, mean map and every head, labelled
    <image stem>/attention.safetensors   raw maps [heads, h, w] float32 ("attention")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dinocli.data import DECODE_ERRORS, open_rgb, quiet_large_images
from dinocli.errors import UsageError
from dinocli.io import atomic_write_bytes, check_output_path
from dinocli.visualize.attention import (
    ImageAttention,
    attention_mask,
    attention_maps,
    attention_query,
    preprocess,
    require_attention,
    select_heads,
    upsample,
)
from dinocli.visualize.colormaps import apply_colormap, lookup_table
from dinocli.visualize.index_page import IndexEntry, write_index_html
from dinocli.visualize.render import contact_sheet, head_color, overlay_mask, write_png

ImageSource = str | Path | tuple[str, Image.Image]


@dataclass
class ImagePage:
    """What was written for one image."""

    name: str
    folder: Path
    size: tuple[int, int]  # (H, W) the model saw
    heads: list[int]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class AttentionPages:
    """What :func:`write_attention_pages` wrote."""

    output: Path
    index: Path
    images: list[ImagePage]


def threshold_tag(threshold: float) -> str:
    """How a threshold appears in file names: ``0.6`` -> ``"0.6"``."""
    return f"{threshold:g}"


def write_image_page(
    result: ImageAttention,
    folder: str | Path,
    threshold: float | None = None,
    colormap: str = "viridis",
    upsample_mode: str = "nearest",
    tile_size: int = 224,
) -> ImagePage:
    """Write one image's pictures and raw maps into ``folder`` (see the module docstring)."""
    lookup_table(colormap)  # an unknown colour map fails before anything is written
    folder = Path(folder)
    p = result.patch_size
    maps = result.maps.float()
    photo = np.asarray(result.photo.convert("RGB"))
    H, W = photo.shape[:2]
    if maps.shape[1] * p != H or maps.shape[2] * p != W:
        raise ValueError(f"maps {list(maps.shape)} at patch {p} do not cover a {W}x{H} photo")
    page = ImagePage(result.name, folder, (H, W), list(result.heads))
    files = page.files
    files["image"] = write_png(folder / "image.png", photo)

    large = upsample(maps, p, upsample_mode).numpy()
    mean_large = upsample(maps.mean(dim=0, keepdim=True), p, upsample_mode)[0].numpy()
    colored = {j: apply_colormap(m, colormap) for j, m in zip(result.heads, large)}
    for j, picture in colored.items():
        files[f"attn-head{j}"] = write_png(folder / f"attn-head{j}.png", picture)
    mean_picture = apply_colormap(mean_large, colormap)
    files["attn-mean"] = write_png(folder / "attn-mean.png", mean_picture)

    tiles: list[tuple[str, Image.Image]] = [
        (f"{result.name} ({W}x{H})", result.photo),
        ("mean of heads", Image.fromarray(mean_picture)),
    ]
    if threshold is not None:
        tag = threshold_tag(threshold)
        masks = upsample(attention_mask(maps, threshold).float(), p, "nearest").numpy() > 0.5
        n = len(result.heads)
        for k, (j, mask) in enumerate(zip(result.heads, masks)):
            files[f"mask-head{j}"] = write_png(
                folder / f"mask-th{tag}-head{j}.png", mask.astype(np.uint8) * 255
            )
            tinted = overlay_mask(photo, mask, head_color(k, n), outline=max(1, round(min(H, W) / 160)))
            files[f"overlay-head{j}"] = write_png(folder / f"overlay-head{j}.png", tinted)
            tiles.append((f"head {j}: {float(threshold):.0%} mass", Image.fromarray(tinted)))
    else:
        tiles += [(f"head {j}", Image.fromarray(colored[j])) for j in result.heads]
    title = f"{result.name}: last-block {result.query} attention, patch {p}" + (
        f", masks hold {threshold:.0%} of each head's mass" if threshold is not None else ""
    )
    files["grid"] = write_png(folder / "grid.png", contact_sheet(tiles, tile_size=tile_size, title=title))

    metadata = {
        "heads": json.dumps(result.heads),
        "patch_size": str(p),
        "image_size": json.dumps([H, W]),
        "source": result.name,
        "description": f"{result.query}-to-patch attention of the last block, [heads, h, w]",
    }
    files["attention"] = folder / "attention.safetensors"
    atomic_write_bytes(
        files["attention"], safetensors_bytes({"attention": maps.contiguous()}, metadata=metadata)
    )
    return page


def write_attention_pages(
    model: nn.Module,
    images: Sequence[ImageSource],
    output: str | Path,
    *,
    image_size: int | tuple[int, int] = (480, 480),
    heads: Sequence[int] | None = None,
    threshold: float | None = None,
    colormap: str = "viridis",
    upsample_mode: str = "nearest",
    batch_size: int = 4,
    title: str = "DINO self-attention maps",
    on_image: Callable[[ImagePage], None] | None = None,
) -> AttentionPages:
    """Attention pictures of every image under ``output`` and an ``index.html`` showing them all.

    ``images`` are file paths or ``(name, PIL image)`` pairs. ``image_size`` as torchvision's
    ``Resize``: ``(H, W)``, or an int for the short side (aspect ratio kept). ``on_image`` is
    called after each image (e.g. to advance a progress bar).
    """
    require_attention(model)
    check_page_options(colormap, upsample_mode, threshold, batch_size)
    num_heads = getattr(model, "num_heads", None)
    if heads is not None and isinstance(num_heads, int):
        select_heads(num_heads, heads)
    if not images:
        raise UsageError("no images to show")
    output = Path(output)
    check_output_path(output, "--output", folder=True)
    for source in images:  # every image decodes before a page is written: no half-written output
        _open(source)
    names = unique_names([_source_name(s) for s in images])
    patch = int(model.patch_size)
    pages: list[ImagePage] = []
    for start in range(0, len(images), batch_size):
        chunk = list(zip(names[start : start + batch_size], images[start : start + batch_size]))
        prepared = [preprocess(_open(source), image_size, patch) for _, source in chunk]
        maps = attention_maps(model, [tensor for tensor, _ in prepared], heads)
        for (name, _), (_, photo), m in zip(chunk, prepared, maps):
            shown = list(dict.fromkeys(heads)) if heads is not None else list(range(m.shape[0]))
            result = ImageAttention(name, photo, m, shown, patch, attention_query(model))
            page = write_image_page(
                result, output / name, threshold, colormap, upsample_mode
            )
            pages.append(page)
            if on_image is not None:
                on_image(page)
    index = output / "index.html"
    entries = [
        IndexEntry(
            r.name,
            f"{r.name}/grid.png",
            f"{r.size[1]}x{r.size[0]} px, heads {', '.join(map(str, r.heads))}",
        )
        for r in pages
    ]
    details = f"Last-block {attention_query(model)} attention, patch size {patch}, colour map {colormap}"
    if threshold is not None:
        details += f"; masks hold at least {threshold:.0%} of each head's attention mass"
    write_index_html(index, title, entries, details + ".")
    return AttentionPages(output, index, pages)


def check_page_options(
    colormap: str = "viridis",
    upsample_mode: str = "nearest",
    threshold: float | None = None,
    batch_size: int = 1,
) -> None:
    """Raise a :class:`UsageError` for a bad option before any work is done."""
    lookup_table(colormap)
    upsample(torch.zeros(1, 1, 1), 1, upsample_mode)
    if threshold is not None:
        attention_mask(torch.ones(1, 1), threshold)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats made distinct by a ``-2``, ``-3``, ... suffix."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in seen:
            candidate, k = f"{name}-{k}", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _source_name(source: ImageSource) -> str:
    name = source[0] if isinstance(source, tuple) else Path(source).stem
    name = name.strip().replace("/", "_").replace("\\", "_")
    return name if name not in ("", ".", "..") else "image"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, tuple):
        return source[1]
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with quiet_large_images():
            return open_rgb(path)
    except DECODE_ERRORS as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None
