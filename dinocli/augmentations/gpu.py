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

On CPUs the cost is the number of passes over the pixels and of calls, so each operation works
in place on the views it is given (slices of the batch), avoids temporaries, bool-to-float
conversions and ``torch.where`` (slow there), and the jitter of all views takes seven passes (see
:func:`colour_views_sorted`).
"""

from __future__ import annotations

import functools
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
        n = len(params)
        jitter, order, factors, grayscale, sigma, solar = _view_lists(params)
        return ColourParams(
            jitter=torch.tensor(jitter, dtype=torch.bool),
            order=torch.tensor(order, dtype=torch.int64).reshape(n, 4),
            factors=torch.tensor(factors, dtype=torch.float64).reshape(n, 4),
            grayscale=torch.tensor(grayscale, dtype=torch.bool),
            blur_sigma=torch.tensor(sigma, dtype=torch.float64).reshape(n),
            solarize=torch.tensor(solar, dtype=torch.bool),
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

    @staticmethod
    def stack(items: Sequence[ColourParams]) -> ColourParams:
        """The parameters of ``B`` images' ``V`` views each, every field ``[B, V, ...]`` (a batch)."""
        return ColourParams(
            *(torch.stack([getattr(p, f) for p in items]) for f in ColourParams.__dataclass_fields__)
        )

    def per_view(self, images: Sequence[int] | None = None) -> list[ColourParams]:
        """Of :meth:`stack`ed parameters: each view's parameters over ``images`` (rows; default all)."""
        rows = slice(None) if images is None else torch.tensor(images)
        fields = ColourParams.__dataclass_fields__
        return [ColourParams(*(getattr(self, f)[rows, v] for f in fields)) for v in range(self.jitter.shape[1])]


# --- single operations on [B, 3, H, W] float levels, factors [B] ---------------------------------
#
# Each public operation returns a new tensor; the pipeline uses the in-place versions (trailing
# ``_``), which run the same arithmetic on the views they are given (slices of a batch): no copies.


def grey(x: torch.Tensor) -> torch.Tensor:
    """The grey levels ``[B, 1, H, W]`` of RGB levels ``[B, 3, H, W]``, rounded (PIL's ``L``)."""
    wr, wg, wb = GREY_WEIGHTS
    r, g, b = x.chunk(3, dim=1)
    return (r * wr).add_(g, alpha=wg).add_(b, alpha=wb).round_()


def _per_view(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
    """A factor per view, broadcastable over ``x``; a plain number for a single view (cheaper)."""
    if factor.numel() == 1:
        return float(factor)
    return factor.to(x.dtype).to(x.device, non_blocking=True).view(-1, 1, 1, 1)  # no wait for the device


def _blend_(x: torch.Tensor, ref: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """``ref + factor (x - ref)`` in place, clamped to ``[0, 255]`` and truncated (``Image.blend``)."""
    return x.sub_(ref).mul_(_per_view(factor, x)).add_(ref).clamp_(0, 255).floor_()


def _mean_grey(g: torch.Tensor) -> torch.Tensor:
    """The mean of grey levels ``[B, 1, H, W]`` per view, rounded to a whole level (as PIL does)."""
    return g.mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()


def _brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_view(factor, x)).clamp_(0, 255).floor_()


def _contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, _mean_grey(grey(x)), factor)


def _saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, grey(x), factor)


def _hue_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r, g, b = x.chunk(3, dim=1)
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
    shifts = np.trunc(factor.detach().cpu().numpy() * 255) * (6 / 255)  # PIL: whole 1/255 turns
    offsets = torch.from_numpy((shifts.reshape(-1, 1) + np.array([5.0, 3.0, 1.0])) % 6 - 5).to(x.dtype)
    k = hue + offsets.view(-1, 3, 1, 1).to(x.device, non_blocking=True)  # in [-6, 6)
    return torch.addcmul(mn, k.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1), chroma, out=x).round_()


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor``, clamped to ``[0, 255]`` and truncated to a level (PIL's ``Image.blend``)."""
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level (rounded to a whole level, as PIL does)."""
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image (truncated to a level, as PIL's ``Image.blend``)."""
    return _saturation_(x.clone(), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``int(factor * 255) / 255`` turns; value and saturation are kept.

    With the hue ``H`` in sixths of a turn, each channel of the result is
    ``min + chroma * clamp(d - 1, 0, 1)`` where ``d`` is the distance of ``H + shift + n - 2``
    to the nearest multiple of 6 (``n`` = 5, 3, 1 for R, G, B): the usual HSV-to-RGB formula,
    written ``d = ||H + o| - 3|`` with ``o`` the channel's offset reduced to ``[-5, 1)``.
    """
    return _hue_(x.clone(), factor)


_JITTER = (_brightness_, _contrast_, _saturation_, _hue_)


def adjust_jitter_(x: torch.Tensor, kinds: Sequence[int], factor: torch.Tensor) -> torch.Tensor:
    """Jitter operation ``kinds[i]`` (0 brightness, 1 contrast, 2 saturation, 3 hue) of view ``i``,
    in place.

    Views with different operations among brightness, contrast and saturation are done in one
    pass, each as the blend ``r + f (x - r)`` with ``r`` zero, its mean grey level or its grey
    image: the same arithmetic, so the same levels, as each operation alone.
    """
    k = np.asarray(kinds).reshape(-1)
    if (k == k[0]).all():
        return _JITTER[int(k[0])](x, factor)
    if (k == 3).any():
        raise ValueError("hue cannot be done in one pass with other jitter operations")
    g = grey(x)
    masks = torch.from_numpy(np.stack([k == 1, k == 2]).astype(np.float32)).to(x.dtype)
    is_contrast, is_saturation = masks.to(x.device, non_blocking=True).reshape(2, -1, 1, 1, 1)
    ref = _mean_grey(g).mul_(is_contrast)
    if (k == 2).any():
        ref = g.mul_(is_saturation).add_(ref)  # exactly 0, the mean or the grey image
    return _blend_(x, ref, factor)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """The grey image repeated over three channels."""
    return grey(x).expand_as(x).contiguous()


def _grayscale_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(grey(x).expand_as(x))


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Levels that round to 128 or more become ``255 - level``."""
    return torch.minimum(x, 255 - x)  # 255 - x < x exactly when x > 127.5


def _solarize_(x: torch.Tensor) -> torch.Tensor:
    return torch.minimum(x, 255 - x, out=x)


def pil_blur_kernel(sigma: float, passes: int = BLUR_PASSES) -> torch.Tensor:
    """The 1-d kernel (float64, odd length) of PIL's ``GaussianBlur(radius=sigma)``.

    PIL runs ``passes`` box filters of a fractional radius ``l + a`` (weights 1 inside, ``a`` at
    both ends); their convolution is the kernel here.
    """
    return torch.from_numpy(pil_blur_kernels([sigma], passes)[0])


def pil_blur_kernels(sigmas: Sequence[float], passes: int = BLUR_PASSES) -> list[np.ndarray]:
    """:func:`pil_blur_kernel` of each sigma (``[1.0]`` for ``sigma <= 0``), computed together for
    the sigmas of the same box length (a batch has hundreds of blurred views)."""
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    out = [np.ones(1)] * len(s)
    blurred = s > 0
    # Pillow's _gaussian_blur_radius: box length, its integer and fractional radius
    var = np.where(blurred, s * s / passes, 1.0)
    l = np.floor((np.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) * (l + 1)))
    for radius in np.unique(l[blurred]):
        (rows,) = np.nonzero(blurred & (l == radius))
        box = np.ones((len(rows), 2 * int(radius) + 3))
        box[:, 0] = box[:, -1] = a[rows]
        box /= box.sum(axis=1, keepdims=True)
        kernel = box
        for _ in range(passes - 1):
            kernel = _convolve_rows(kernel, box)
        for i, k in zip(rows.tolist(), kernel):
            out[i] = k
    return out


def _convolve_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The full convolution of each row of ``a`` with the same row of ``b``."""
    out = np.zeros((a.shape[0], a.shape[1] + b.shape[1] - 1))
    for j in range(b.shape[1]):
        out[:, j : j + a.shape[1]] += a * b[:, j : j + 1]
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """PIL's Gaussian blur of each view with its own ``sigma`` (all > 0), edges extended."""
    return _blur_where(x.clone(), sigma.tolist())


def _blur_where(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """:func:`gaussian_blur` in place of the views whose sigma is > 0, in groups of equal kernel
    length (7 taps below sigma ~1.41, 13 above): a small sigma costs a short kernel."""
    halves = [k[len(k) // 2 :] if s > 0 else None for s, k in zip(sigmas, pil_blur_kernels(sigmas))]
    for n in sorted({len(h) for h in halves if h is not None}):
        select = [h is not None and len(h) == n for h in halves]
        weights = np.zeros((len(halves), n))
        for i, h in enumerate(halves):
            if select[i]:
                weights[i] = h
        x = _apply_to(x, select, _blur_, torch.from_numpy(weights).to(x.dtype), max_runs=1)
    return x


def _blur_(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric kernels (``weights``: ``[B, n]``, centre first) applied in place to rows then
    columns, as sums of shifted slices of the edge-extended views (faster than a convolution on CPUs).

    The views are extended on all sides once: blurring the extended rows gives the rows the
    column pass needs (extending an edge commutes with blurring along it).
    """
    half = weights.shape[1] - 1
    w = weights.to(x.device, non_blocking=True).view(-1, 1, 1, 1, half + 1).unbind(-1)
    padded = F.pad(x, (half, half, half, half), mode="replicate")
    shifted = padded.unfold(-1, x.shape[-1], 1).unbind(-2)  # padded[..., j : j + wd] for each j
    rows = shifted[half] * w[0]
    pair = torch.empty_like(rows)  # one buffer for the sum of the two slices at each distance
    for j in range(1, half + 1):
        rows.addcmul_(torch.add(shifted[half - j], shifted[half + j], out=pair), w[j])
    shifted = rows.unfold(-2, x.shape[-2], 1).transpose(-1, -2).unbind(-3)  # rows[..., j : j + h, :]
    torch.mul(shifted[half], w[0], out=x)
    pair = pair[..., : x.shape[-2], :]
    for j in range(1, half + 1):
        x.addcmul_(torch.add(shifted[half - j], shifted[half + j], out=pair), w[j])
    return x.round_()


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


def _apply_to(
    x: torch.Tensor, select: list[bool], fn, *args: torch.Tensor | list, max_runs: int = 2
) -> torch.Tensor:
    """The in-place operation ``fn`` applied to the views where ``select`` holds, with the matching
    entries of ``args`` (tensors or lists): on slices when they form at most ``max_runs`` runs of
    consecutive views (no copies), else on one gathered copy."""
    runs = _runs(select)
    if len(runs) <= max_runs:
        for start, stop in runs:
            fn(x[start:stop], *(a[start:stop] for a in args))
        return x
    rows = [i for i, flag in enumerate(select) if flag]
    index = torch.tensor(rows)
    device_index = index.to(x.device, non_blocking=True)
    picked = (a[index] if isinstance(a, torch.Tensor) else [a[i] for i in rows] for a in args)
    return x.index_copy_(0, device_index, fn(x.index_select(0, device_index), *picked))


#: Steps of the colour jitter in :func:`colour_views_sorted`: every view does its hue at step 3.
JITTER_STEPS = 7


def _jitter_steps(jitter: Sequence[bool] | np.ndarray, order: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """The jitter operation of each view at each of :data:`JITTER_STEPS` steps (-1: none), int64
    ``[n, JITTER_STEPS]``.

    A view whose hue comes at position ``h`` of its order does position ``p`` at step
    ``p + 3 - h``: every hue falls on step 3, and with the views sorted by ``h`` (latest first,
    views without jitter last) the views of each step are consecutive.
    """
    jitter = np.asarray(jitter, dtype=bool).reshape(-1)
    order = np.asarray(order, dtype=np.int64).reshape(-1, 4)
    steps = np.full((len(jitter), JITTER_STEPS), -1, dtype=np.int64)
    (rows,) = np.nonzero(jitter)
    hue_at = np.argmax(order[rows] == 3, axis=1)
    steps[rows[:, None], np.arange(4) + (3 - hue_at)[:, None]] = order[rows]
    return steps


def _take(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """The views ``x[index]`` (``x`` itself when ``index`` keeps them in place)."""
    if index == list(range(x.shape[0])):
        return x
    return x.index_select(0, torch.tensor(index).to(x.device, non_blocking=True))


def colour_views(x: torch.Tensor, params: ColourParams | Sequence[ViewParams]) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarisation of ``x`` (``[B, 3, H, W]``, levels 0-255).

    ``x`` may be uint8 (converted) or float (may be changed in place); ``params``: the views' colour
    parameters, or their :class:`ViewParams`. Parameters stay on the CPU: which views each
    operation applies to is decided there, so nothing waits on the device.
    """
    x, views = colour_views_sorted(x, params)
    return _take(x, sorted(range(len(views)), key=views.__getitem__))


def colour_views_sorted(
    x: torch.Tensor, params: ColourParams | Sequence[ViewParams]
) -> tuple[torch.Tensor, list[int]]:
    """:func:`colour_views` with the views left in the order it processed them: row ``j`` of the
    result is view ``views[j]``, for ``(result, views)`` returned.

    The jitter takes seven passes, one per step of :func:`_jitter_steps`, each over consecutive
    views once the views are sorted (more than two views; two are at most two runs anyway). Each
    view gets the same arithmetic as its operations one by one.
    """
    n = x.shape[0]
    if len(params) != n:
        raise ValueError(f"{len(params)} colour parameters for {n} views")
    jitter, order, factors, grayscale, sigma, solar = _param_arrays(params)
    steps = _jitter_steps(jitter, order)
    views = list(range(n))
    if n > 2:
        first = np.where(jitter, np.argmax(steps >= 0, axis=1), JITTER_STEPS)
        views = np.argsort(first, kind="stable").tolist()  # latest hue first, no jitter last
    x = _take(x, views).to(torch.float32, memory_format=torch.contiguous_format)
    steps = steps[views]
    picked = np.take_along_axis(factors.reshape(-1, 4)[views], steps.clip(min=0), axis=1)
    step_factors = torch.from_numpy(np.where(steps >= 0, picked, 1.0))
    for step in range(JITTER_STEPS):
        kinds = steps[:, step]
        x = _apply_to(x, (kinds >= 0).tolist(), adjust_jitter_, kinds.tolist(), step_factors[:, step])
    x = _apply_to(x, grayscale[views].tolist(), _grayscale_)
    x = _blur_where(x, sigma[views].tolist())
    return _apply_to(x, solar[views].tolist(), _solarize_), views


def _param_arrays(params: ColourParams | Sequence[ViewParams]) -> tuple[np.ndarray, ...]:
    """Jitter flags, orders, factors, grayscale flags, blur sigmas (0: none), solarise flags."""
    if isinstance(params, ColourParams):
        return tuple(getattr(params, f).cpu().numpy() for f in ColourParams.__dataclass_fields__)
    jitter, order, factors, grayscale, sigma, solar = _view_lists(params)
    return (np.asarray(jitter, dtype=bool), np.asarray(order, dtype=np.int64).reshape(-1, 4),
            np.asarray(factors, dtype=np.float64).reshape(-1, 4), np.asarray(grayscale, dtype=bool),
            np.asarray(sigma, dtype=np.float64), np.asarray(solar, dtype=bool))


def _view_lists(params: Sequence[ViewParams]) -> tuple[list, list, list, list, list, list]:
    """The fields of :class:`ColourParams` as lists, for views ``params`` (identity jitter and
    sigma 0 where an operation does not apply)."""
    js = [p.jitter for p in params]
    return (
        [j is not None for j in js],
        [list(j.order) if j else [0, 0, 0, 0] for j in js],
        [[j.brightness, j.contrast, j.saturation, j.hue] if j else [1.0, 1.0, 1.0, 0.0] for j in js],
        [p.grayscale for p in params],
        [p.blur_sigma or 0.0 for p in params],
        [p.solarize for p in params],
    )


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
        x = colour_views(x, ColourParams.cat([colour[v] for v in members]))
        x = normalize(x, mean, std)
        for v, part in zip(members, x.split([crops[v].shape[0] for v in members])):
            out[v] = part
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32 ``[B, 3, H, W]`` (a new tensor)."""
    scale, shift = _normalizer(tuple(mean), tuple(std), x.device)
    return x.float().mul(scale).sub_(shift)


@functools.lru_cache(maxsize=16)
def _normalizer(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale and shift of :func:`normalize`, made once per device."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)
    return scale, shift
