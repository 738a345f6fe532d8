"""The built-in demo data set: procedurally generated, labelled images of textured shapes.

Ten classes (circle, square, triangle, star, ring, cross, stripes, checker, dots, blob), each
image with a random background (colour and gradient), a random foreground colour, position,
size and rotation, and pixel noise: a class is decided by shape, not by colour or place. The set
is generated once (deterministically: the same bytes on every machine with the same Pillow) into
``<cache>/demo/demo-v1/{train,val}/<class>/<nnnn>.png``; ``<cache>`` is ``$DINOCLI_CACHE`` or
``~/.cache/dinocli``. Generation builds a temporary folder and renames it into place, so an
interrupted run never leaves a half-written set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dinocli.errors import DinoError

CACHE_ENV = "DINOCLI_CACHE"
VERSION = "demo-v1"
CLASSES = ("blob", "checker", "circle", "cross", "dots", "ring", "square", "star", "stripes", "triangle")
MANIFEST = "manifest.json"
SPLITS = {"train": 0, "val": 1}

Shape = Callable[[np.ndarray, np.ndarray, np.random.Generator, float], np.ndarray]


def cache_dir() -> Path:
    """dinocli's cache folder: ``$DINOCLI_CACHE`` or ``~/.cache/dinocli``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dinocli"


def demo_dataset(
    root: str | Path | None = None,
    *,
    train_per_class: int = 200,
    val_per_class: int = 50,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """The demo data set folder (``<root>/demo-v1``, with ``train`` and ``val``), generated if needed.

    ``root`` defaults to ``<cache>/demo``. Non-default counts, size or seed give a folder named
    after them (e.g. ``demo-v1-s48-t20-v5-seed1``), so they never clash with the default set.
    """
    root = Path(root) if root is not None else cache_dir() / "demo"
    settings = {
        "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed
    }  # fmt: skip
    if min(train_per_class, val_per_class) < 1 or size < 16:
        raise DinoError(f"demo data needs >= 1 image per class and split and size >= 16, got {settings}")
    name = VERSION
    if (train_per_class, val_per_class, size, seed) != (200, 50, 32, 0):
        name += f"-s{size}-t{train_per_class}-v{val_per_class}-seed{seed}"
    dest = root / name
    if _complete(dest, settings):
        return dest
    if dest.exists():
        raise DinoError(f"{dest} exists but is not a complete demo data set: remove it and run again")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        write_demo_images(tmp, **settings)
        (tmp / MANIFEST).write_text(json.dumps({"version": VERSION, **settings}, indent=1) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _complete(dest, settings):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_demo_images(dest: Path, train_per_class: int, val_per_class: int, size: int, seed: int) -> None:
    """Write the PNG files of every split and class into ``dest`` (ImageFolder layout)."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, cls in enumerate(CLASSES):
            folder = dest / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                demo_image(label, i, split, size, seed).save(folder / f"{i:04d}.png", optimize=False)


def demo_image(label: int, index: int, split: str = "train", size: int = 32, seed: int = 0) -> Image.Image:
    """Image ``index`` of class ``CLASSES[label]`` in ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], label, index])
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres in [0, 1]
    background = _background(rng, xx, yy)
    fg = _foreground_colour(rng, background.mean(axis=(0, 1)))
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    radius = rng.uniform(0.22, 0.36)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / radius  # rotated coordinates in units of the radius
    v = (-(xx - cx) * s + (yy - cy) * c) / radius
    alpha = SHAPES[CLASSES[label]](u, v, rng, radius * size)
    shade = 1 + 0.08 * np.sin(2 * np.pi * (rng.uniform(1, 3) * u + rng.uniform(0, 1)))  # a soft texture
    image = background * (1 - alpha[..., None]) + (fg * shade[..., None]) * alpha[..., None]
    image += rng.normal(0, 6, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    a, b = rng.uniform(0, 255, size=(2, 3))
    t = np.clip(rng.uniform(-1, 1) * (xx - 0.5) + rng.uniform(-1, 1) * (yy - 0.5) + 0.5, 0, 1)
    return a + (b - a) * 0.5 * t[..., None]


def _foreground_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background).sum() > 180:
            return colour
    return 255 - background


def _edge(distance: np.ndarray, pixels: float) -> np.ndarray:
    """Antialiased coverage from a signed distance (negative inside) in radius units."""
    return np.clip(0.5 - distance * pixels, 0, 1)


def _circle(u, v, rng, px):
    return _edge(np.hypot(u, v) - 1, px)


def _ring(u, v, rng, px):
    return _edge(np.abs(np.hypot(u, v) - 0.75) - rng.uniform(0.15, 0.25), px)


def _square(u, v, rng, px):
    return _edge(np.maximum(np.abs(u), np.abs(v)) - 0.8, px)


def _triangle(u, v, rng, px):
    normals = [(np.cos(a), np.sin(a)) for a in np.pi / 2 + 2 * np.pi / 3 * np.arange(3)]
    return _edge(np.max([nx * u + ny * v for nx, ny in normals], axis=0) - 0.6, px)


def _star(u, v, rng, px):
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    return _edge(r - (0.6 + 0.4 * np.cos(5 * theta)), px / 2)


def _cross(u, v, rng, px):
    w = rng.uniform(0.2, 0.3)
    bar1 = np.maximum(np.abs(u) - 1, np.abs(v) - w)
    bar2 = np.maximum(np.abs(v) - 1, np.abs(u) - w)
    return _edge(np.minimum(bar1, bar2), px)


def _stripes(u, v, rng, px):
    period = rng.uniform(0.45, 0.7)
    return np.clip(2 * np.sin(2 * np.pi * u / period) + 0.5, 0, 1) * _edge(np.hypot(u, v) - 1.3, px)


def _checker(u, v, rng, px):
    period = rng.uniform(0.6, 0.9)
    cells = np.sin(np.pi * u / period * 2) * np.sin(np.pi * v / period * 2)
    return np.clip(4 * cells + 0.5, 0, 1) * _edge(np.maximum(np.abs(u), np.abs(v)) - 1.1, px)


def _dots(u, v, rng, px):
    spacing = rng.uniform(0.55, 0.75)
    du = (u / spacing + 0.5) % 1 - 0.5
    dv = (v / spacing + 0.5) % 1 - 0.5
    return _edge(np.hypot(du, dv) * spacing - 0.14, px) * _edge(np.hypot(u, v) - 1.3, px)


def _blob(u, v, rng, px):
    stretch = rng.uniform(0.6, 1.0)
    return np.exp(-(u**2 + (v / stretch) ** 2) * 1.5)


SHAPES: dict[str, Shape] = {
    "blob": _blob,
    "checker": _checker,
    "circle": _circle,
    "cross": _cross,
    "dots": _dots,
    "ring": _ring,
    "square": _square,
    "star": _star,
    "stripes": _stripes,
    "triangle": _triangle,
}


def _complete(dest: Path, settings: dict[str, int]) -> bool:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest == {"version": VERSION, **settings}
