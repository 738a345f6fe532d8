"""Built-in recipes: named sets of ``dino pretrain`` defaults (``--recipe NAME``).

- ``reference``: the reference implementation's defaults, unchanged.
- ``small-data``: for data sets of thousands to tens of thousands of small images (CIFAR-like,
  32 px) and runs of tens of epochs, where the reference defaults learn nothing: a ViT-Tiny of 6
  blocks (twice the epochs of 12 in the same time) with 4-px patches on 32/16-px crops and a
  convolutional stem in place of the patch projection (at the reference's learning rate: higher
  rates peak early, then unlearn), prototypes scaled to the data set, Sinkhorn-Knopp targets with
  the KoLeo regulariser (without KoLeo the embeddings collapse to a few directions and k-NN falls
  below random initialisation; Sinkhorn-Knopp learns faster than centering beside it), a teacher
  whose EMA horizon fits the run (fast on small data), and warm-ups fitted to the number of epochs.
- ``auto``: scales every such choice from the data set's size, its image size and ``--epochs``,
  and says why for each value.

Options given in a config file or on the command line always override a recipe.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import dinocli
from dinocli.data import image_file, list_images
from dinocli.errors import UsageError

#: The run length ``small-data`` fits its warm-ups to when ``--epochs`` is not given.
SMALL_DATA_EPOCHS = 30


@dataclass(frozen=True)
class DataStats:
    """What ``auto`` needs to know about a data set."""

    n_images: int
    image_size: int  # median shorter side of a sample, in pixels


def describe_data(root: str | Path, sample: int = 32) -> DataStats:
    """Count the images of ``root`` (a folder or tar shards) and read the sizes of an even sample
    of them (headers only)."""
    paths = list_images(root)
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(image_file(path)) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):
            continue
    return DataStats(len(paths), int(statistics.median(sides)) if sides else 224)


def _warmups(epochs: int) -> dict[str, tuple[Any, str]]:
    return {
        "warmup_epochs": (
            min(10, max(1, epochs // 10)),
            f"learning-rate warm-up of a tenth of the {epochs} epochs (at most the reference's 10)",
        ),
        "teacher_temp": (
            0.04,
            "teacher temperature kept at 0.04: on small data, raising it to 0.07 made the teacher "
            "uniform (collapse) within an epoch in our runs",
        ),
        "warmup_teacher_temp_epochs": (0, "no temperature warm-up at a constant 0.04"),
    }


#: The collapse strategies for small data: Sinkhorn-Knopp targets, and KoLeo on the embeddings.
SMALL_DATA_COLLAPSE = (
    "sinkhorn-knopp,koleo",
    "KoLeo keeps the embeddings spread (with centering alone they collapsed to a few directions and "
    "k-NN fell below random initialisation); Sinkhorn-Knopp targets learned faster than centering "
    "beside it: k-NN 32.7 vs 27.9 % on cifar10_sub after 5 epochs, 36.0 vs 31.2 % on the demo textures",
)


def momentum_for(iterations: int) -> float:
    """Teacher momentum whose EMA horizon ``1 / (1 - m)`` is 1/40 of the run, between 20 and 250
    iterations (250, i.e. the reference's 0.996, for long runs)."""
    horizon = min(250.0, max(20.0, iterations / 40))
    return round(1.0 - 1.0 / horizon, 4)


def prototypes_for(n_images: int) -> int:
    """About one prototype per image, as a power of two between 1024 and 65536."""
    return int(min(65536, max(1024, 2 ** round(math.log2(max(n_images, 1))))))


def scaled_to_data(n_images: int, epochs: int, batch: int = 64) -> dict[str, tuple[Any, str]]:
    """Prototypes from the data set's size, and a teacher momentum that fits the run's length."""
    iterations = epochs * max(1, n_images // batch)
    return {
        "out_dim": (prototypes_for(n_images), f"about one prototype per image ({n_images} images)"),
        "momentum_teacher": (
            momentum_for(iterations),
            f"teacher EMA horizon of 1/40 of the run's ~{iterations} iterations (20 to 250)",
        ),
    }


def crops_for(image_size: int) -> dict[str, int]:
    """Crop sizes and patch size for images whose shorter side is ``image_size`` pixels."""
    if image_size < 64:
        return {"global_crop_size": 32, "local_crop_size": 16, "patch_size": 4}
    if image_size < 96:
        return {"global_crop_size": 64, "local_crop_size": 32, "patch_size": 8}
    if image_size < 224:
        return {"global_crop_size": 96, "local_crop_size": 48, "patch_size": 8}
    return {"global_crop_size": 224, "local_crop_size": 96, "patch_size": 16}


#: The ViT patch embedding for small data, and the learning rate it trains at.
SMALL_DATA_PATCH_EMBED = (
    "conv",
    "a convolutional stem instead of the patch projection (Xiao et al. 2021): k-NN 37.1 against "
    "32.5 % with the projection (at lr 0.002) on cifar10_sub after the same 40 CPU-minutes",
)
SMALL_DATA_DEPTH = (
    6,
    "6 transformer blocks instead of 12, as compact ViTs for small data sets (Hassani et al. 2021): "
    "twice the epochs in the same time; k-NN 36.3-37.1 / 38.6-40.0 % at 32 / 40 px on cifar10_sub "
    "after 40 CPU-minutes, against 34.5-35.4 / 36.6 % with 12",
)
SMALL_DATA_LR = (
    0.0005,
    "the reference's learning rate: with the convolutional stem, 0.002 and 0.001 peaked after 2 "
    "and 4 epochs (31.7, 36.0 %), then unlearned (30.0, 31.2 % at the end of 40 CPU-minutes)",
)


def _small_data_training(epochs: int) -> dict[str, tuple[Any, str]]:
    """What ``small-data`` and ``auto`` (below 100k images) both set, whatever the image size."""
    return {
        "depth": SMALL_DATA_DEPTH,
        "patch_embed": SMALL_DATA_PATCH_EMBED,
        "local_crops_number": (6, "6 local crops"),
        "collapse": SMALL_DATA_COLLAPSE,
        "lr": SMALL_DATA_LR,
        "drop_path_rate": (0.0, "no stochastic depth for a tiny model and small data"),
        **_warmups(epochs),
    }


#: Crop scales for small (< 96 px) images.
SMALL_IMAGE_SCALES: dict[str, tuple[Any, str]] = {
    "global_crops_scale": ((0.35, 1.0), "global crops keep at least 35 % of a small image"),
    "local_crops_scale": ((0.1, 0.35), "local crops of 10-35 %: smaller ones are mostly blur at 32 px"),
}


def reference(**_: Any) -> dict[str, Any]:
    """The reference implementation's defaults: nothing to change."""
    return {}


def small_data(
    epochs: int | None = None, n_images: int | None = None, **_: Any
) -> dict[str, tuple[Any, str]]:
    """Fixed choices for CIFAR-like data; the warm-ups follow ``epochs``, and the prototypes and
    teacher momentum the data set's size where it is known (``n_images``)."""
    epochs = epochs or SMALL_DATA_EPOCHS
    values: dict[str, tuple[Any, str]] = {
        "arch": ("vit_tiny", "a small backbone for thousands of images"),
        "patch_size": (4, "4-px patches: 64 tokens on a 32-px crop"),
        "global_crop_size": (32, "32-px global crops for small images"),
        "local_crop_size": (16, "16-px local crops"),
        **SMALL_IMAGE_SCALES,
        "out_dim": (4096, "4096 prototypes for thousands of images (65536 is for ImageNet)"),
        "momentum_teacher": (
            0.95, "teacher EMA horizon of 20 iterations: it keeps up with a student that learns fast"
        ),
        "epochs": (epochs, "the run length the warm-ups are fitted to"),
        **_small_data_training(epochs),
    }
    if n_images:
        values.update(scaled_to_data(n_images, epochs))
    return values


def auto(
    n_images: int | None = None, image_size: int | None = None, epochs: int | None = None, **_: Any
) -> dict[str, tuple[Any, str]]:
    """Every choice scaled from the data set (``n_images``, ``image_size``) and ``epochs``."""
    if not n_images or not image_size:
        raise UsageError("--recipe auto needs an image folder as --data to scale from")
    epochs = epochs or 100
    small = n_images < 100_000
    crops = crops_for(image_size)
    values: dict[str, tuple[Any, str]] = {
        "arch": (
            "vit_tiny" if small else "vit_small",
            f"{n_images} images: " + ("ViT-Tiny for fewer than 100k images" if small else "ViT-Small, as the paper"),
        ),
        "patch_size": (crops["patch_size"], f"images of about {image_size} px"),
        "global_crop_size": (crops["global_crop_size"], f"images of about {image_size} px"),
        "local_crop_size": (crops["local_crop_size"], "half the global crop (96 for 224-px crops)"),
        **scaled_to_data(n_images, epochs),
    }
    if small:
        values.update(_small_data_training(epochs))
        if image_size < 96:
            values.update(SMALL_IMAGE_SCALES)
    else:
        values["drop_path_rate"] = (0.1, "the reference's stochastic depth")
    return values


@dinocli.hookimpl
def dinocli_register_recipes(register) -> None:
    register("reference", reference, description="the reference implementation's defaults")
    register("small-data", small_data, description="thousands of small images, tens of epochs")
    register("auto", auto, description="scaled from the data set's size, image size and --epochs")
