"""Colour maps without matplotlib: 256-entry lookup tables interpolated from a few anchor colours.

Each map is defined by 9 anchor colours at the positions 0, 1/8, ..., 1 (the published 9-step
hex codes of matplotlib's perceptually uniform ``viridis``, ``inferno`` and ``magma``); the table
linearly interpolates every channel between neighbouring anchors. ``gray`` runs from black to
white. The result is within a few levels of the original maps, which is all a picture needs.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_ANCHORS: dict[str, tuple[str, ...]] = {
    "viridis": (
        "440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725",
    ),
    "inferno": (
        "000004", "1f0c48", "550f6d", "88226a", "ba3655", "e35933", "f98e09", "f9cb35", "fcffa4",
    ),
    "magma": (
        "000004", "1c1044", "4f127b", "812581", "b5367a", "e55064", "fb8761", "fec287", "fcfdbf",
    ),
    "gray": ("000000", "ffffff"),
}

#: Names accepted by ``--colormap``.
COLORMAPS = tuple(_ANCHORS)


def anchor_colors(name: str) -> np.ndarray:
    """The anchor colours of colour map ``name`` as ``uint8 [n, 3]``."""
    _check(name)
    return np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _ANCHORS[name]], np.uint8)


@cache
def lookup_table(name: str, size: int = 256) -> np.ndarray:
    """``uint8 [size, 3]``: anchors spread evenly over ``[0, 1]``, linear interpolation between them."""
    anchors = anchor_colors(name).astype(np.float64)
    where = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, size)
    table = np.stack([np.interp(x, where, anchors[:, c]) for c in range(3)], axis=1)
    table = np.rint(table).astype(np.uint8)
    table.setflags(write=False)
    return table


def apply_colormap(
    values: np.ndarray, name: str = "viridis", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Colour a 2-D array: ``uint8 [H, W, 3]``.

    Values are scaled linearly from ``[vmin, vmax]`` (the array's own minimum and maximum by
    default, as ``matplotlib.pyplot.imsave`` does) to the table; a constant array gets the first
    colour.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {values.shape}")
    table = lookup_table(name)
    lo = float(np.nanmin(values)) if vmin is None else float(vmin)
    hi = float(np.nanmax(values)) if vmax is None else float(vmax)
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    index = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * (len(table) - 1)).astype(np.intp)
    return table[index]


def _check(name: str) -> None:
    if name not in _ANCHORS:
        from dinocli.errors import unknown_name

        raise unknown_name("colour map", name, COLORMAPS)
