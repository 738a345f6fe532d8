"""Finding and decoding images: recursive folders, ImageFolder labels, any image mode to RGB."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

from dinocli.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: What decoding a broken, truncated or hostile file raises: ``UnidentifiedImageError`` is an
#: ``OSError``; ``DecompressionBombError`` an image of more than twice PIL's ``MAX_IMAGE_PIXELS``.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@contextlib.contextmanager
def quiet_large_images() -> Iterator[None]:
    """Decode without PIL's ``DecompressionBombWarning``, which it gives for every image between its
    pixel limit and twice that (and decodes): one warning per large file of a data set, from every
    worker. Past twice the limit PIL still raises ``DecompressionBombError`` (in :data:`DECODE_ERRORS`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def resolve_data(data: str | Path) -> Path:
    """The image folder ``--data`` names: ``demo`` is the built-in data set's training split."""
    if str(data) == "demo":
        from dinocli.data.demo_set import demo_dataset

        return demo_dataset() / "train"
    return Path(data)


def find_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted, hidden files skipped)."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not images:
        exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise UsageError(f"no images found under {root} (looked for {exts})")
    return images


def image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Images with labels: ImageFolder layout (label = index of the class folder in sorted order).

    When ``root`` holds images outside class folders, it is a plain folder tree: every label is -1
    and the class list is empty.
    """
    root = Path(root)
    images = find_images(root)
    if any(p.parent == root for p in images):
        return images, [-1] * len(images), []
    classes = sorted({p.relative_to(root).parts[0] for p in images})
    index = {name: i for i, name in enumerate(classes)}
    return images, [index[p.relative_to(root).parts[0]] for p in images], classes


def image_file(item: str | Path | Any) -> str | Path | IO[bytes]:
    """What ``Image.open`` reads for an image of ``--data``: a file name as it is, a member of a
    tar shard (:class:`~dinocli.data.shards.ShardMember`) as its bytes in memory."""
    return item if isinstance(item, (str, os.PathLike)) else io.BytesIO(item.read_bytes())


def read_image_bytes(item: str | Path | Any) -> bytes:
    """The encoded bytes of an image file or of a tar shard member."""
    return Path(item).read_bytes() if isinstance(item, (str, os.PathLike)) else item.read_bytes()


def open_rgb(path: str | Path | Any) -> Image.Image:
    """Decode ``path`` (a file or a tar shard member) as an RGB image, whatever its mode
    (grayscale, RGBA, palette, CMYK, 16-bit)."""
    with Image.open(image_file(path)) as img:
        img.load()
        return to_rgb(img)


def load_rgb(img: Image.Image, reduce: int = 1) -> Image.Image:
    """Decode an image opened with ``Image.open`` (not yet loaded) as RGB.

    ``reduce > 1`` decodes a JPEG at about ``1/reduce`` of its size (PIL's ``draft``: DCT scaling,
    much faster, never smaller than ``size / reduce``); other formats decode at full size.
    """
    if reduce > 1 and img.format == "JPEG":
        img.draft(img.mode, (-(-img.width // reduce), -(-img.height // reduce)))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB; 16-bit and float images are rescaled to 8 bits, alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L") if img.mode != "I" else _scale_int(img)
    elif img.mode == "F":
        img = _scale_int(img)
    elif img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _scale_int(img: Image.Image) -> Image.Image:
    lo, hi = img.getextrema()
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return img.point(lambda v: (v - lo) * scale).convert("L")
