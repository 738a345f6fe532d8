"""``example_simple``: multi-crop with random resized crops and horizontal flips only.

Every random number comes from the :class:`torch.Generator` passed with the image, so that the
crops of an image depend only on that generator's seed (reproducible, whatever the number of
data-loading workers or the global random state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from dinocli.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(0, high, (), generator=generator))


def random_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering a random ``scale`` fraction of the image area.

    The aspect ratio is log-uniform in ``ratio``; after 10 tries that do not fit, the whole image.
    """
    area = width * height
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    return 0, 0, height, width


class ExampleSimple:
    """``n_global`` global crops then ``n_local`` local crops, each a normalised ``[3, h, w]`` tensor."""

    n_global = 2

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 6,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip_probability: float = 0.5,
    ) -> None:
        scales = {"global_crops_scale": global_crops_scale, "local_crops_scale": local_crops_scale}
        for name, pair in scales.items():
            if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= 1:
                raise UsageError(
                    f"{name} must be two numbers 0 < min <= max <= 1, got {tuple(pair)}"
                )
        if local_crops_number < 0:
            raise UsageError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.n_local = int(local_crops_number)
        self.global_crop_size = int(global_crop_size)
        self.local_crop_size = int(local_crop_size)
        self.mean = list(mean)
        self.std = list(std)
        self.flip_probability = flip_probability

    def crop(
        self, image: Image.Image, size: int, scale: Sequence[float], generator: torch.Generator
    ) -> torch.Tensor:
        """One random resized crop of ``image``, maybe flipped, as a normalised tensor."""
        top, left, h, w = random_crop_box(image.width, image.height, scale, generator)
        view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if torch.rand((), generator=generator).item() < self.flip_probability:
            view = TF.hflip(view)
        return TF.normalize(TF.to_tensor(view), self.mean, self.std)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]:
        image = image.convert("RGB")
        crops = [
            self.crop(image, self.global_crop_size, self.global_crops_scale, generator)
            for _ in range(self.n_global)
        ]
        crops += [
            self.crop(image, self.local_crop_size, self.local_crops_scale, generator)
            for _ in range(self.n_local)
        ]
        return crops


def build_example_simple(**kwargs: Any) -> ExampleSimple:
    """Factory: takes the keyword arguments dinocli passes and ignores any it does not know."""
    known = (
        "global_crops_scale", "local_crops_scale", "local_crops_number", "global_crop_size",
        "local_crop_size", "mean", "std", "flip_probability",
    )
    return ExampleSimple(**{k: v for k, v in kwargs.items() if k in known})
