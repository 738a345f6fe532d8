"""The built-in ``dino`` augmentation: the multi-crop pipeline of Caron et al. (2021).

Two global crops and ``local_crops_number`` local crops, exactly the reference implementation's
``DataAugmentationDINO``: RandomResizedCrop (bicubic) -> horizontal flip (p 0.5) -> colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order, p 0.8) -> grayscale (p 0.2)
-> Gaussian blur (sigma 0.1-2.0; p 1.0 on global view 1, 0.1 on global view 2, 0.5 on local
views) -> solarisation (p 0.2, global view 2 only) -> ToTensor -> Normalize.

Two paths, with the same random parameters (the same :meth:`DinoMultiCrop.sample`):

- the fast path (default): crops are cut, resized (torch's uint8 antialiased bicubic kernel) and
  flipped as uint8 tensors, then the colour operations run batched over the views of each size
  in float arithmetic (:mod:`dinocli.augmentations.gpu`, the same code as ``--augment-on gpu``).
  Views differ from PIL's by rounding: well under one grey level on average.
- ``pil_resize=True``: PIL's resize and PIL's colour operations; every view is byte-for-byte what
  torchvision's PIL transforms produce for the same random parameters (slower).

Every random number comes from the :class:`torch.Generator` passed to the call: one block of
uniforms per image (:data:`UNIFORMS_PER_VIEW` per view), so the same generator state gives the
same crops in any process. :meth:`DinoMultiCrop.plan` samples them from the image size alone, so a
data set can decode a JPEG at reduced size when every crop allows it (:meth:`draft_factor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

import dinocli
from dinocli.augmentations import gpu, ops
from dinocli.augmentations.params import UNIFORMS_PER_VIEW, ViewParams, ViewSpec, sample_view
from dinocli.data import to_rgb
from dinocli.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoMultiCrop:
    """The DINO multi-crop pipeline: ``__call__(image, generator) -> [global1, global2, local...]``."""

    n_global = 2

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pil_resize: bool = False,
        blur_sigma: Sequence[float] | None = None,
    ) -> None:
        g_scale = _scale("global_crops_scale", global_crops_scale)
        l_scale = _scale("local_crops_scale", local_crops_scale)
        self.n_local = _count("local_crops_number", local_crops_number)
        g_size = _size("global_crop_size", global_crop_size)
        l_size = _size("local_crop_size", local_crop_size)
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        self.pil_resize = bool(pil_resize)
        if min(self.std) <= 0:
            raise UsageError(f"std must be positive, got {list(self.std)}")
        # Blur sigmas are in pixels: the reference's 0.1-2.0 is for 224-px crops, and is scaled down
        # with smaller global crops (at 32 px it would erase the image). Unchanged at 224 px.
        sigma = _scale_sigma(blur_sigma, g_size)
        self.specs: tuple[ViewSpec, ...] = (
            ViewSpec(size=g_size, scale=g_scale, blur_p=1.0, blur_sigma=sigma),
            ViewSpec(size=g_size, scale=g_scale, blur_p=0.1, solarize_p=0.2, blur_sigma=sigma),
        ) + (ViewSpec(size=l_size, scale=l_scale, blur_p=0.5, blur_sigma=sigma),) * self.n_local

    def sample(self, height: int, width: int, generator: torch.Generator) -> list[ViewParams]:
        """The random parameters of every view of a ``height x width`` image."""
        block = torch.rand((len(self.specs), UNIFORMS_PER_VIEW), generator=generator, dtype=torch.float64)
        return [sample_view(height, width, spec, u) for spec, u in zip(self.specs, block.tolist())]

    def apply(self, image: Image.Image, params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """The views of ``image`` for given parameters (from :meth:`sample`)."""
        if self.pil_resize:
            src = ops.image_to_uint8(to_rgb(image))
            return [self._view(src, spec, p) for spec, p in zip(self.specs, params)]
        return self.colour(self.crops(image, params), params)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]:
        image = to_rgb(image)
        return self.apply(image, self.sample(image.height, image.width, generator))

    # -- the fast path, in two stages (the second one may run on the accelerator) -------------

    def crops(
        self, image: Image.Image, params: Sequence[ViewParams], scale: float = 1.0
    ) -> list[torch.Tensor]:
        """Cut, resize and flip every view: uint8 tensors ``[3, size, size]``, no colour change.

        ``scale``: the size of ``image`` relative to the one ``params`` were sampled for (an image
        decoded at reduced size, see :meth:`draft_factor`); boxes are rounded to its pixels.
        """
        ops.reuse_freed_memory()  # in the process that augments (a data loader worker)
        src = ops.image_to_uint8(to_rgb(image))
        height, width = src.shape[-2:]
        out = []
        for spec, p in zip(self.specs, params):
            top, left, h, w = p.top, p.left, p.height, p.width
            if scale != 1.0:
                top, left = min(round(top * scale), height - 1), min(round(left * scale), width - 1)
                h = max(1, min(round(p.height * scale), height - top))
                w = max(1, min(round(p.width * scale), width - left))
            crop = src[:, :, top : top + h, left : left + w]
            if (h, w) != (spec.size, spec.size):
                size = (spec.size, spec.size)
                crop = F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False)
            if p.flip:
                crop = crop.flip(-1)
            out.append(crop[0])
        return out

    def colour(
        self, crops: Sequence[torch.Tensor], params: Sequence[ViewParams], normalized: bool = True
    ) -> list[torch.Tensor]:
        """Colour operations and normalisation of :meth:`crops`, batched over views of one size.

        ``normalized=False``: the views as uint8 levels (every colour operation ends on whole
        levels), for :func:`dinocli.augmentations.gpu.normalize` to finish elsewhere with the same
        result: a quarter of the bytes to send to the training device.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            groups.setdefault(tuple(crop.shape), []).append(i)
        views: list[torch.Tensor] = [torch.empty(0)] * len(crops)
        for members in groups.values():
            x = torch.stack([crops[i] for i in members])
            x, order = gpu.colour_views_sorted(x, [params[i] for i in members])
            x = gpu.normalize(x, self.mean, self.std) if normalized else x.to(torch.uint8)
            for j, view in zip(order, x):
                views[members[j]] = view
        return views

    # -- decoding at reduced size ------------------------------------------------------------

    def plan(self, size: tuple[int, int], generator: torch.Generator) -> list[ViewParams]:
        """:meth:`sample` for an image of ``size = (width, height)``, before it is decoded."""
        return self.sample(size[1], size[0], generator)

    def draft_factor(self, params: Sequence[ViewParams], max_factor: int = 8) -> int:
        """The largest reduction (1, 2, 4 or 8) at which every crop box still has at least as many
        pixels per side as its view: decoding a JPEG that much smaller loses no detail a view keeps.
        """
        factor = 1
        while factor < max_factor and all(
            min(p.height, p.width) >= 2 * factor * spec.size for spec, p in zip(self.specs, params)
        ):
            factor *= 2
        return factor

    def _view(self, src: torch.Tensor, spec: ViewSpec, p: ViewParams) -> torch.Tensor:
        view = ops.resized_crop(src, p.top, p.left, p.height, p.width, spec.size, pil=self.pil_resize)
        if p.flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if p.jitter is not None:
            view = ops.color_jitter(view, p.jitter)
        if p.grayscale:
            view = view.convert("L")  # expanded to 3 equal channels by to_normalized_tensor
        if p.blur_sigma is not None:
            view = ops.gaussian_blur(view, p.blur_sigma)
        if p.solarize:
            view = ops.solarize(view)
        return ops.to_normalized_tensor(view, self.mean, self.std)

    def __repr__(self) -> str:
        g, loc = self.specs[0], self.specs[-1]
        return (
            f"DinoMultiCrop(global {self.n_global}x{g.size}px scale {g.scale}, "
            f"local {self.n_local}x{loc.size}px scale {loc.scale if self.n_local else '-'})"
        )


def build(**kwargs: Any) -> DinoMultiCrop:
    """Factory of the ``dino`` augmentation; unknown keyword arguments are ignored."""
    known = (
        "global_crops_scale", "local_crops_scale", "local_crops_number",
        "global_crop_size", "local_crop_size", "mean", "std", "pil_resize", "blur_sigma",
    )  # fmt: skip
    return DinoMultiCrop(**{k: v for k, v in kwargs.items() if k in known and v is not None})


@dinocli.hookimpl
def dinocli_register_augmentations(register) -> None:
    register("dino", build, description="DINO multi-crop: 2 global + N local crops (Caron et al. 2021)")


def _scale_sigma(blur_sigma: Sequence[float] | None, global_crop_size: int) -> tuple[float, float]:
    """The blur sigma range: given, or the reference's (0.1, 2.0) scaled by ``min(1, size / 224)``."""
    if blur_sigma is not None:
        lo, hi = (float(v) for v in blur_sigma)
        if not 0 < lo <= hi:
            raise UsageError(f"blur_sigma must satisfy 0 < min <= max, got {lo} {hi}")
        return lo, hi
    factor = min(1.0, global_crop_size / 224)
    return 0.1 * factor, 2.0 * factor


def _scale(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be two numbers (min max), got {value!r}") from None
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"{name} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    return lo, hi


def _size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive whole number of pixels, got {value!r}")
    return value


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def _triple(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be three numbers (one per RGB channel), got {value!r}") from None
    return a, b, c
