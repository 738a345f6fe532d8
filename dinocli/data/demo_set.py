"""The built-in demo data set: procedurally generated, labelled images of textures.

Ten classes (bricks, checker, confetti, dots, grid, rings, spokes, stripes, waves, zigzag), each
image a pattern filling the frame, with a random period, orientation and phase, two tinted
colours of different lightness in a random order, and pixel noise: a class is decided by the
pattern, not by colour, scale or place. Every crop of an image shows its pattern, which is what
DINO's multi-crop objective can learn from in minutes (version 1's small shapes on coloured
backgrounds mostly taught it the background). The set is generated once (deterministically: the
same bytes on every machine with the same Pillow) into
``<cache>/demo/demo-v2/{train,val}/<class>/<nnnn>.png``; ``<cache>`` is ``$DINOCLI_CACHE`` or
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
VERSION = "demo-v2"
CLASSES = ("bricks", "checker", "confetti", "dots", "grid", "rings", "spokes", "stripes", "waves", "zigzag")
MANIFEST = "manifest.json"
SPLITS = {"train": 0, "val": 1}

Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator, float], np.ndarray]


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
    name = CLASSES[label]
    period = rng.uniform(0.18, 0.3)  # of the image side
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    low, high = (0.3, 0.7) if name in CENTRED else (0.0, 1.0)
    x, y = xx - rng.uniform(low, high), yy - rng.uniform(low, high)
    u = (x * c + y * s) / period  # rotated coordinates in periods
    v = (-x * s + y * c) / period
    alpha = PATTERNS[name](u, v, rng, period * size)
    ink, paper = _colours(rng)
    image = paper * (1 - alpha[..., None]) + ink * alpha[..., None]
    image += rng.normal(0, 6, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two tinted colours of clearly different lightness, in a random order."""
    tint = rng.uniform(0, 1, size=3)
    light = 255 * rng.uniform(0.55, 0.9) * (0.8 + 0.2 * tint)
    dark = 255 * rng.uniform(0.05, 0.4) * (0.8 + 0.2 * tint[::-1])
    return (light, dark) if rng.uniform() < 0.5 else (dark, light)


def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave of period 1 in [0, 1]: the distance to the nearest integer, doubled."""
    return 2 * np.abs(x - np.floor(x + 0.5))


def _edge(distance: np.ndarray, pixels: float) -> np.ndarray:
    """Antialiased coverage from a signed distance (negative inside), ``pixels`` per unit."""
    return np.clip(0.5 - distance * pixels, 0, 1)


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.abs(x - np.round(x))


def _stripes(u, v, rng, px):
    return _edge(_tri(u) - 0.5, px)


def _checker(u, v, rng, px):
    return ((np.floor(u) + np.floor(v)) % 2).astype(float)


def _dots(u, v, rng, px):
    return _edge(np.hypot(_nearest(u), _nearest(v)) - 0.28, px)


def _grid(u, v, rng, px):
    return _edge(0.12 - np.minimum(_nearest(u), _nearest(v)), px)


def _rings(u, v, rng, px):
    return _edge(_tri(np.hypot(u, v)) - 0.5, px)


def _spokes(u, v, rng, px):
    return _edge(_tri(np.arctan2(v, u) * 4 / np.pi) - 0.5, 8)  # 8 spokes; a fixed edge width in angle


def _waves(u, v, rng, px):
    return _edge(_tri(u + 0.35 * np.sin(2 * np.pi * v / 1.5)) - 0.5, px)


def _zigzag(u, v, rng, px):
    return _edge(_tri(u + 0.8 * _tri(v)) - 0.5, px)


def _bricks(u, v, rng, px):
    along = u / 2 + 0.5 * (np.floor(v) % 2)  # bricks two periods long, every other row shifted
    return _edge(0.1 - np.minimum(_nearest(v), 2 * _nearest(along)), px)


def _confetti(u, v, rng, px):
    cells = rng.uniform(0, 1, size=(16, 16)) < 0.4
    return cells[np.floor(u).astype(int) % 16, np.floor(v).astype(int) % 16].astype(float)


PATTERNS: dict[str, Pattern] = {
    "bricks": _bricks,
    "checker": _checker,
    "confetti": _confetti,
    "dots": _dots,
    "grid": _grid,
    "rings": _rings,
    "spokes": _spokes,
    "stripes": _stripes,
    "waves": _waves,
    "zigzag": _zigzag,
}
#: Patterns drawn around a centre, which is kept inside the image.
CENTRED = ("rings", "spokes")


def _complete(dest: Path, settings: dict[str, int]) -> bool:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest == {"version": VERSION, **settings}
