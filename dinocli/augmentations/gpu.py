"""Batched colour operations of the DINO pipeline with per-view random parameters, on any device.

The same code runs on CPU tensors (the fast CPU path of the ``dino`` augmentation applies it to the
views of one image, grouped by size) and on the accelerator (``--augment-on gpu`` applies it to a
whole batch). Pixels are float levels in ``[0, 255]``; every operation clamps to that range and
rounds (or truncates, where PIL does) to whole levels, as PIL's 8-bit arithmetic does.

The operations and their order are torchvision's (``ColorJitter`` with a random order, then
``RandomGrayscale``) and the reference's (``GaussianBlur``, ``Solarization``):

- brightness ``x * b``; contrast ``m + c (x - m)`` with ``m`` the mean grey level rounded to a whole
  level (as PIL does); saturation ``g + s (x - g)`` with ``g`` the grey image; grey is
  ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``L``);
- hue: a rotation of the HSV hue by ``int(h * 255) / 255`` turns, as PIL shifts it (value and
  saturation kept), in continuous arithmetic where PIL quantises hue and saturation to 8 bits;
- Gaussian blur: the exact kernel of PIL's ``GaussianBlur(radius=sigma)`` (three extended box
  filters, Gwosdek et al. 2011), applied as one separable convolution with edges extended; views
  are grouped by kernel length, so small sigmas use the 7-tap kernel;
- solarisation: levels ``>= 128`` (after rounding) become ``255 - level``, i.e. ``min(x, 255 - x)``.

On CPUs the cost is the number of passes over the pixels, so each operation avoids temporaries,
bool-to-float conversions and ``torch.where`` (slow there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dinocli.augmentations.params import ViewParams

#: Grey weights of PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale``.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
#: Box-filter passes of PIL's Gaussian blur.
BLUR_PASSES = 3


@dataclass(frozen=True)
class ColourParams:
    """The colour parameters of ``B`` views as CPU tensors (what workers send with uint8 crops).

    ``jitter``: bool ``[B]``; ``order``: int64 ``[B, 4]`` (0 brightness, 1 contrast,
    2 saturation, 3 hue); ``factors``: float64 ``[B, 4]`` in that op order; ``grayscale`` and
    ``solarize``: bool ``[B]``; ``blur_sigma``: float64 ``[B]``, 0 where the view is not blurred.
    """

    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    @staticmethod
    def from_views(params: Sequence[ViewParams]) -> ColourParams:
        """The colour parameters of the views ``params`` (from ``DinoMultiCrop.sample``)."""
        n, js = len(params), [p.jitter for p in params]
        return ColourParams(
            jitter=torch.tensor([j is not None for j in js], dtype=torch.bool),
            order=torch.tensor([j.order if j else (0, 0, 0, 0) for j in js], dtype=torch.int64).reshape(n, 4),
            factors=torch.tensor(
                [(j.brightness, j.contrast, j.saturation, j.hue) if j else (1.0, 1.0, 1.0, 0.0) for j in js],
                dtype=torch.float64,
            ).reshape(n, 4),
            grayscale=torch.tensor([p.grayscale for p in params], dtype=torch.bool),
            blur_sigma=torch.tensor([p.blur_sigma or 0.0 for p in params], dtype=torch.float64).reshape(n),
            solarize=torch.tensor([p.solarize for p in params], dtype=torch.bool),
        )

    def select(self, index: int) -> ColourParams:
        """The parameters of view ``index`` alone."""
        return ColourParams(
            *(getattr(self, f)[index : index + 1] for f in ColourParams.__dataclass_fields__)
        )

    @staticmethod
    def cat(items: Sequence[ColourParams]) -> ColourParams:
        """The parameters of several groups of views, one after the other (a batch)."""
        return ColourParams(
            *(torch.cat([getattr(p, f) for p in items]) for f in ColourParams.__dataclass_fields__)
        )


# --- single operations on [B, 3, H, W] float levels, factors [B] ---------------------------------


def grey(x: torch.Tensor) -> torch.Tensor:
    """The grey levels ``[B, 1, H, W]`` of RGB levels ``[B, 3, H, W]``, rounded (PIL's ``L``)."""
    r, g, b = GREY_WEIGHTS
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b).round_()


def _per_view(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
    """A factor per view, broadcastable over ``x``; a plain number for a single view (cheaper)."""
    if factor.numel() == 1:
        return float(factor)
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor``, clamped to ``[0, 255]`` and truncated to a level (PIL's ``Image.blend``)."""
    return (x * _per_view(factor, x)).clamp_(0, 255).floor_()


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level (rounded to a whole level, as PIL does)."""
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()
    f = _per_view(factor, x)
    return ((x - mean).mul_(f).add_(mean)).clamp_(0, 255).floor_()


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image (truncated to a level, as PIL's ``Image.blend``)."""
    g = grey(x)
    return ((x - g).mul_(_per_view(factor, x)).add_(g)).clamp_(0, 255).floor_()


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``int(factor * 255) / 255`` turns; value and saturation are kept.

    With the hue ``H`` in sixths of a turn, each channel of the result is
    ``min + chroma * clamp(d - 1, 0, 1)`` where ``d`` is the distance of ``H + shift + n - 2``
    to the nearest multiple of 6 (``n`` = 5, 3, 1 for R, G, B): the usual HSV-to-RGB formula,
    written ``d = ||H + o| - 3|`` with ``o`` the channel's offset reduced to ``[-5, 1)``.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    mx = torch.maximum(r, g)
    torch.maximum(mx, b, out=mx)
    mn = torch.minimum(r, g)
    torch.minimum(mn, b, out=mn)
    chroma = mx - mn
    # hue times chroma, exact in whole levels: from blue (max B), overridden by green, then red
    hue = (r - g).add_(chroma, alpha=4)
    is_max = torch.eq(g, mx, out=torch.empty_like(mx))  # 0/1 as floats: no bool conversion
    hue.addcmul_(is_max, (b - r).add_(chroma, alpha=2).sub_(hue))
    torch.eq(r, mx, out=is_max)
    hue.addcmul_(is_max, (g - b).sub_(hue))
    hue.mul_(chroma.clamp_min(1e-6).reciprocal_())  # in [-1, 5]
    shifts = [math.trunc(f * 255) * (6 / 255) for f in factor.tolist()]  # PIL: whole 1/255 turns
    offsets = torch.tensor([[(s + n) % 6 - 5 for n in (5.0, 3.0, 1.0)] for s in shifts], dtype=x.dtype)
    k = hue + offsets.view(-1, 3, 1, 1).to(x.device, non_blocking=True)  # in [-6, 6)
    return torch.addcmul(mn, k.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1), chroma).round_()


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """The grey image repeated over three channels."""
    return grey(x).expand_as(x).contiguous()


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Levels that round to 128 or more become ``255 - level``."""
    return torch.minimum(x, 255 - x)  # 255 - x < x exactly when x > 127.5


def pil_blur_kernel(sigma: float, passes: int = BLUR_PASSES) -> torch.Tensor:
    """The 1-d kernel (float64, odd length) of PIL's ``GaussianBlur(radius=sigma)``.

    PIL runs ``passes`` box filters of a fractional radius ``l + a`` (weights 1 inside, ``a`` at
    both ends); their convolution is the kernel here.
    """
    if sigma <= 0:
        return torch.ones(1, dtype=torch.float64)
    # Pillow's _gaussian_blur_radius: box length, its integer and fractional radius
    var = sigma * sigma / passes
    length = math.sqrt(12.0 * var + 1.0)
    l = math.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) * (l + 1)))
    box = np.array([a] + [1.0] * (2 * l + 1) + [a])
    box /= box.sum()
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    return torch.from_numpy(kernel)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """PIL's Gaussian blur of each view with its own ``sigma`` (all > 0), edges extended."""
    return _blur_where(x, sigma.tolist())


def _blur_where(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """:func:`gaussian_blur` of the views whose sigma is > 0, in groups of equal kernel length
    (7 taps below sigma ~1.41, 13 above): a small sigma costs a short kernel."""
    halves = [_half_kernel(s) if s > 0 else [] for s in sigmas]
    for n in sorted({len(h) for h in halves} - {0}):
        weights = torch.tensor([h if len(h) == n else [0.0] * n for h in halves], dtype=x.dtype)
        x = _apply_to(x, [len(h) == n for h in halves], _blur, weights)
    return x


def _half_kernel(sigma: float) -> list[float]:
    """The centre and one side of :func:`pil_blur_kernel`."""
    kernel = pil_blur_kernel(sigma)
    return kernel[len(kernel) // 2 :].tolist()


def _blur(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric kernels (``weights``: ``[B, n]``, centre first) applied to rows then columns, as
    sums of shifted slices of the edge-extended views (faster than a convolution on CPUs).

    The views are extended on all sides once: blurring the extended rows gives the rows the
    column pass needs (extending an edge commutes with blurring along it).
    """
    half = weights.shape[1] - 1
    w = weights.to(x.device, non_blocking=True).view(-1, 1, 1, 1, half + 1)
    h, wd = x.shape[-2:]
    padded = F.pad(x, (half, half, half, half), mode="replicate")
    rows = padded[..., half : half + wd] * w[..., 0]  # [B, C, h + 2 half, wd]
    pair = torch.empty_like(rows)  # one buffer for the sum of the two slices at each distance
    for j in range(1, half + 1):
        torch.add(padded[..., half - j : half - j + wd], padded[..., half + j : half + j + wd], out=pair)
        rows.addcmul_(pair, w[..., j])
    out = rows[..., half : half + h, :] * w[..., 0]
    pair = pair[..., :h, :]
    for j in range(1, half + 1):
        torch.add(rows[..., half - j : half - j + h, :], rows[..., half + j : half + j + h, :], out=pair)
        out.addcmul_(pair, w[..., j])
    return out.round_()


# --- the whole colour pipeline -------------------------------------------------------------------


def _runs(select: list[bool]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive true values."""
    runs, start = [], None
    for i, flag in enumerate([*select, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _apply_to(x: torch.Tensor, select: list[bool], fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the views where ``select`` holds: on slices when they form at most two
    runs of consecutive views (no copies; the views of one image), else on one gathered copy."""
    runs = _runs(select)
    if len(runs) == 1 and runs[0] == (0, x.shape[0]):
        return fn(x, *args)
    if len(runs) <= 2:
        for start, stop in runs:
            x[start:stop] = fn(x[start:stop], *(a[start:stop] for a in args))
        return x
    index = torch.tensor([i for i, flag in enumerate(select) if flag])
    device_index = index.to(x.device, non_blocking=True)
    return x.index_copy_(0, device_index, fn(x.index_select(0, device_index), *(a[index] for a in args)))


def colour_views(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarisation of ``x`` (``[B, 3, H, W]``, levels 0-255).

    ``x`` may be uint8 (converted) or float (changed in place). Parameters stay on the CPU: which
    views each operation applies to is decided there, so nothing waits on the device.
    """
    if len(params) != x.shape[0]:
        raise ValueError(f"{len(params)} colour parameters for {x.shape[0]} views")
    x = x.float() if not x.is_floating_point() else x
    jitter = params.jitter.tolist()
    order = params.order.tolist()
    for position in range(4):
        for op in range(4):
            select = [on and o[position] == op for on, o in zip(jitter, order)]
            x = _apply_to(x, select, _JITTER[op], params.factors[:, op])
    x = _apply_to(x, params.grayscale.tolist(), to_grayscale)
    x = _blur_where(x, params.blur_sigma.tolist())
    return _apply_to(x, params.solarize.tolist(), solarize)


def colour_batch(
    crops: Sequence[torch.Tensor],
    colour: Sequence[ColourParams],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> list[torch.Tensor]:
    """Colour operations and normalisation of a batch on ``device``.

    ``crops[v]``: uint8 ``[B, 3, h, w]`` of view ``v`` (CPU or ``device``), ``colour[v]``: its
    parameters. Views of one size are processed together. Returns float32 views on ``device``.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for v, crop in enumerate(crops):
        groups.setdefault(tuple(crop.shape[1:]), []).append(v)
    out: list[torch.Tensor] = [torch.empty(0)] * len(crops)
    for members in groups.values():
        x = torch.cat([crops[v].to(device, non_blocking=True) for v in members])
        x = colour_views(x.float(), ColourParams.cat([colour[v] for v in members]))
        x = normalize(x, mean, std)
        for v, part in zip(members, x.split([crops[v].shape[0] for v in members])):
            out[v] = part
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32 ``[B, 3, H, W]`` (a new tensor)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=x.device).view(1, 3, 1, 1)
    return x.float().mul(scale).sub_(shift)
