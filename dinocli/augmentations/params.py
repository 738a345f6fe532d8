"""Random parameters of one multi-crop view, drawn from a fixed-size block of uniforms.

Each view consumes exactly :data:`UNIFORMS_PER_VIEW` uniform numbers in ``[0, 1)``, whatever
operations end up applied, so the random stream (and therefore every other view of the run) does
not depend on the image size or on which branch a sample takes. The sampling rules are
torchvision's (``RandomResizedCrop``, ``ColorJitter``, ``RandomApply``, ``RandomGrayscale``) and
the DINO reference implementation's (``GaussianBlur``, ``Solarization``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Attempts of RandomResizedCrop before its centre-crop fallback (torchvision uses 10).
CROP_ATTEMPTS = 10
#: Uniforms one view consumes: 2 per crop attempt, 2 for the position, flip, jitter gate,
#: 4 for the jitter order, 4 jitter factors, grayscale, blur gate, blur sigma, solarisation.
UNIFORMS_PER_VIEW = 2 * CROP_ATTEMPTS + 2 + 1 + 1 + 4 + 4 + 1 + 2 + 1

ASPECT_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ColorJitterParams:
    """One draw of torchvision's ``ColorJitter``: the order of the four ops and their factors.

    ``order`` is a permutation of ``0..3`` (0 brightness, 1 contrast, 2 saturation, 3 hue).
    """

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view: crop box, flip, colour jitter, grayscale, blur, solarise."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: ColorJitterParams | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


@dataclass(frozen=True)
class ViewSpec:
    """What kind of view to draw: output size, crop scale range and the per-view probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    flip_p: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    uniforms: Sequence[float],
    ratio: tuple[float, float] = ASPECT_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop box, exactly torchvision's sampling rule.

    Up to 10 attempts draw an area fraction uniformly in ``scale`` and a log-uniform aspect ratio
    in ``ratio``; the first box that fits is placed uniformly at random. If none fits, the
    largest centred box with an allowed aspect ratio is used. ``uniforms`` holds
    ``2 * CROP_ATTEMPTS + 2`` numbers in ``[0, 1)``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        u_area, u_ratio = uniforms[2 * attempt], uniforms[2 * attempt + 1]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            u_top, u_left = uniforms[2 * CROP_ATTEMPTS], uniforms[2 * CROP_ATTEMPTS + 1]
            return _randint(u_top, height - h + 1), _randint(u_left, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(height: int, width: int, spec: ViewSpec, uniforms: Sequence[float]) -> ViewParams:
    """The parameters of one view of a ``height x width`` image from ``UNIFORMS_PER_VIEW`` uniforms."""
    if len(uniforms) != UNIFORMS_PER_VIEW:
        raise ValueError(f"expected {UNIFORMS_PER_VIEW} uniforms, got {len(uniforms)}")
    n_crop = 2 * CROP_ATTEMPTS + 2
    top, left, h, w = sample_crop_box(height, width, spec.scale, uniforms[:n_crop])
    u = uniforms[n_crop:]
    flip = u[0] < spec.flip_p
    jitter = None
    if u[1] < spec.jitter_p:  # torchvision RandomApply: skip when p < rand
        order = tuple(sorted(range(4), key=lambda k: u[2 + k]))  # uniform random permutation
        jitter = ColorJitterParams(
            order=order,
            brightness=_uniform(u[6], max(0.0, 1 - spec.brightness), 1 + spec.brightness),
            contrast=_uniform(u[7], max(0.0, 1 - spec.contrast), 1 + spec.contrast),
            saturation=_uniform(u[8], max(0.0, 1 - spec.saturation), 1 + spec.saturation),
            hue=_uniform(u[9], -spec.hue, spec.hue),
        )
    grayscale = u[10] < spec.grayscale_p
    blur_sigma = _uniform(u[12], *spec.blur_sigma) if u[11] < spec.blur_p else None
    solarize = u[13] < spec.solarize_p
    return ViewParams(top, left, h, w, flip, jitter, grayscale, blur_sigma, solarize)


def _uniform(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def _randint(u: float, n: int) -> int:
    """An integer uniform in ``[0, n)`` from a uniform ``u`` in ``[0, 1)``."""
    return min(int(u * n), n - 1)
