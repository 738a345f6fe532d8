"""Pictures from attention maps with PIL and numpy: PNG files, mask overlays and contact sheets."""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinocli.io import atomic_write_bytes

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """``image`` (a PIL image, or a ``uint8`` array ``[H, W]``/``[H, W, 3]``) encoded as PNG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | Path, image: Image.Image | np.ndarray) -> Path:
    """Write ``image`` as a PNG file atomically; returns ``path``."""
    atomic_write_bytes(path, png_bytes(image))
    return Path(path)


def head_color(index: int, count: int) -> tuple[int, int, int]:
    """A saturated colour for head ``index`` of ``count``: hues spread evenly around the wheel."""
    r, g, b = colorsys.hsv_to_rgb((index / max(count, 1)) % 1.0, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` steps (4-neighbourhood) of its edge or the image border."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(width, 0)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            inner
            & padded[:-2, 1:-1]
            & padded[2:, 1:-1]
            & padded[1:-1, :-2]
            & padded[1:-1, 2:]
        )
    return mask & ~inner


def overlay_mask(
    photo: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int],
    alpha: float = 0.5,
    outline: int = 2,
) -> np.ndarray:
    """``photo`` (``uint8 [H, W, 3]``) with ``mask`` tinted in ``color`` at ``alpha`` and outlined."""
    photo = np.asarray(photo, dtype=np.uint8)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != photo.shape[:2]:
        raise ValueError(f"mask {mask.shape} and photo {photo.shape[:2]} differ in size")
    out = photo.astype(np.float64)
    tint = np.asarray(color, dtype=np.float64)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    out[mask_outline(mask, outline)] = tint
    return np.rint(out).astype(np.uint8)


def label_font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in default font (scalable where Pillow has FreeType, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def contact_sheet(
    tiles: Sequence[tuple[str, Image.Image]],
    columns: int | None = None,
    tile_size: int = 224,
    title: str | None = None,
    padding: int = 6,
) -> Image.Image:
    """A labelled grid of pictures: each scaled to fit ``tile_size`` pixels, its label above it.

    ``columns`` defaults to about ``sqrt(1.5 n)`` so that sheets are wider than tall.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one picture")
    n = len(tiles)
    columns = max(1, min(n, columns or math.ceil(math.sqrt(1.5 * n))))
    rows = math.ceil(n / columns)
    thumbs = [_fit(img, tile_size) for _, img in tiles]
    cell_w = max(t.width for t in thumbs)
    cell_h = max(t.height for t in thumbs)
    font = label_font()
    line = _text_height(font) + 4
    top = line + padding if title else 0
    width = columns * (cell_w + padding) + padding
    height = top + rows * (line + cell_h + padding) + padding
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((padding, padding), _shorten(draw, title, font, width - 2 * padding), fill=TEXT, font=font)
    for k, ((label, _), thumb) in enumerate(zip(tiles, thumbs)):
        r, c = divmod(k, columns)
        x = padding + c * (cell_w + padding)
        y = top + padding + r * (line + cell_h + padding)
        draw.text((x, y), _shorten(draw, label, font, cell_w), fill=TEXT, font=font)
        sheet.paste(thumb, (x + (cell_w - thumb.width) // 2, y + line))
    return sheet


def _fit(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    scale = size / max(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Nearest keeps patch boundaries sharp when enlarging; Lanczos when shrinking.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.resize(target, resample)


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0))


def _shorten(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
