"""Pixel operations of the DINO pipeline, numerically the same as torchvision's PIL path.

The crop is resized with torch's uint8 antialiased bicubic kernel: the same filter as the PIL
``crop`` + ``resize(BICUBIC)`` that torchvision's ``RandomResizedCrop`` runs, three to four times
faster, equal to PIL's bytes up to a different rounding of the filter weights (most pixels
identical, a few off by one or two levels); ``pil=True`` uses PIL itself. Brightness, contrast
and solarisation are 256-entry lookup tables built with PIL's own ``Image.blend`` (so rounding
and clipping are PIL's), applied in one pass. A grayscale view stays
one channel through blur and solarisation and is expanded to three channels only at the end.
:func:`reuse_freed_memory` keeps the fast path from paying page faults for every image.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageStat

from dinocli.augmentations.params import ColorJitterParams

_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_SOLARIZE_LUT = [v if v < 128 else 255 - v for v in range(256)]


def image_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor ``[1, 3, H, W]`` in channels-last memory (one copy)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)


def resized_crop(
    src: torch.Tensor, top: int, left: int, height: int, width: int, size: int, pil: bool = False
) -> Image.Image:
    """Crop ``src`` (from :func:`image_to_uint8`) and resize it to ``size x size``, bicubic.

    ``pil=True`` resizes with PIL (torchvision's exact bytes, slower).
    """
    if pil:
        crop_hwc = src[0, :, top : top + height, left : left + width].permute(1, 2, 0).contiguous()
        image = Image.frombuffer("RGB", (width, height), crop_hwc.numpy(), "raw", "RGB", 0, 1)
        return image.resize((size, size), Image.Resampling.BICUBIC)
    crop = src[:, :, top : top + height, left : left + width]
    if (height, width) != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    hwc = crop[0].permute(1, 2, 0).contiguous().numpy()  # no copy when already channels-last
    return Image.frombuffer("RGB", (size, size), hwc, "raw", "RGB", 0, 1)


def _blend_lut(degenerate: int, factor: float) -> list[int]:
    """PIL's ``Image.blend(constant, image, factor)`` as a lookup table over the 256 levels."""
    return list(Image.blend(Image.new("L", (256, 1), degenerate), _RAMP, factor).tobytes())


def _apply_lut(image: Image.Image, lut: list[int]) -> Image.Image:
    return image.point(lut * len(image.getbands()))


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_brightness`` (PIL ``ImageEnhance.Brightness``)."""
    return _apply_lut(image, _blend_lut(0, factor))


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_contrast`` (PIL ``ImageEnhance.Contrast``: blend with the mean gray)."""
    gray = image if image.mode == "L" else image.convert("L")
    mean = int(ImageStat.Stat(gray).mean[0] + 0.5)
    return _apply_lut(image, _blend_lut(mean, factor))


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_saturation`` (PIL ``ImageEnhance.Color``: blend with the grayscale)."""
    return Image.blend(image.convert("L").convert(image.mode), image, factor)


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_hue``: rotate PIL's 8-bit HSV hue by ``int(factor * 255)`` (mod 256)."""
    shift = int(factor * 255) % 256  # even a zero shift round-trips through HSV, as torchvision does
    lut = [(v + shift) % 256 for v in range(256)] + list(range(256)) * 2
    return image.convert("HSV").point(lut).convert("RGB")


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: Image.Image, params: ColorJitterParams) -> Image.Image:
    """The four jitter ops in ``params.order`` (torchvision ``ColorJitter.forward``)."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for k in params.order:
        image = _JITTER_OPS[k](image, factors[k])
    return image


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """The reference's blur: PIL ``ImageFilter.GaussianBlur(radius=sigma)``.

    Bands are blurred one by one: the same bytes, faster than PIL's 4-byte RGB pixels.
    """
    blur = ImageFilter.GaussianBlur(radius=sigma)
    if image.mode == "L":
        return image.filter(blur)
    return Image.merge(image.mode, [band.filter(blur) for band in image.split()])


def solarize(image: Image.Image) -> Image.Image:
    """PIL ``ImageOps.solarize`` with threshold 128: levels >= 128 become ``255 - level``."""
    return _apply_lut(image, _SOLARIZE_LUT)


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(image))`` as float32 ``[3, h, w]``; an ``L`` image is repeated."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    h, w = pixels.shape[:2]
    chw = pixels.expand(3, h, w) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    out = torch.empty((3, h, w), dtype=torch.float32).copy_(chw)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return out.mul_(scale).sub_(shift)


@functools.cache
def reuse_freed_memory(keep: int = 64 << 20, largest_from_heap: int = 16 << 20) -> bool:
    """Let glibc's ``malloc`` keep up to ``keep`` bytes of freed memory for reuse (and serve blocks
    up to ``largest_from_heap`` from it), once per process; True if set.

    Each image's float views and temporaries (about 15 MB) are freed and allocated again for the
    next image; by default glibc gives that memory back to the system each time, and touching it
    again (page faults, zeroed pages) costs about as much as the colour arithmetic. Left alone if
    ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_`` is set, or without glibc.
    """
    if {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & os.environ.keys():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, keep)) and bool(mallopt(_M_MMAP_THRESHOLD, largest_from_heap))
