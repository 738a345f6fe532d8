"""Benchmark: images/s per core of dinocli's ``dino`` augmentation against the reference pipeline.

The reference is the DINO implementation's ``DataAugmentationDINO`` (2 x 224 + 8 x 96 crops), written
plainly here with torchvision's PIL transforms and the reference parameters. Both decode and
augment the same JPEGs, on one core (``torch.set_num_threads(1)``), in alternating chunks so that
other load on the machine hits both alike; time is process CPU time. Prints images/s of each, the
ratio, and the machine.

    python benchmarks/augment.py                                   # ../shared/datasets/imagenette224_sub
    python benchmarks/augment.py --data DIR --images 200 --rounds 5 --json out.json
    python benchmarks/augment.py --workers 2     # also: a DataLoader sending float views vs uint8 levels

It also times what a worker does for ``--augment-on split`` (decode, crops, resize and flip; the
training device colours the views, which is not timed here), against the whole ``dinocli`` item.

``--workers N`` also times what a GPU run's workers send through a ``DataLoader`` with N workers:
the normalised float views (what a CPU run uses) against uint8 levels (``MultiCropDataset(levels=True)``,
what a GPU run uses; the GPU then normalises them, which is not timed here) and the uncoloured levels of
``--augment-on split``, in wall time, alternating rounds of 4 batches of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

import dinocli
from dinocli.data import find_images, open_rgb
from dinocli.data.multicrop_dataset import MultiCropDataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette224_sub"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomPILBlur:
    """The reference's ``GaussianBlur``: PIL blur with a radius uniform in [0.1, 2.0], with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class RandomSolarize:
    """The reference's ``Solarization``: ``ImageOps.solarize`` with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class ReferenceDINOAugmentation:
    """``DataAugmentationDINO`` of the reference implementation, with its default parameters."""

    def __init__(self, n_local: int = 8) -> None:
        flip_and_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose([
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_jitter, RandomPILBlur(1.0), normalize,
        ])
        self.global2 = T.Compose([
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_jitter, RandomPILBlur(0.1), RandomSolarize(0.2), normalize,
        ])
        self.local = T.Compose([
            T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
            flip_and_jitter, RandomPILBlur(0.5), normalize,
        ])
        self.n_local = n_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


def cpu_seconds(fn: Callable[[int], object], indices: list[int]) -> float:
    start = time.process_time()
    for i in indices:
        fn(i)
    return time.process_time() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Pillow {Image.__version__}, Python {platform.python_version()}"
    )


def loader_rates(paths: list[Path], workers: int, rounds: int, batch: int = 32) -> dict[str, float]:
    """Images/s through a ``DataLoader`` with ``workers`` workers of float views and of uint8
    levels, in alternating rounds."""
    from torch.utils.data import DataLoader, Subset

    from dinocli.data.multicrop_dataset import collate_multicrop

    aug = dinocli.create_augmentation("dino")
    count = 4 * batch
    seconds = {"float_views": 0.0, "uint8_levels": 0.0, "split_levels": 0.0}
    for _ in range(rounds):
        for name in seconds:
            ds = MultiCropDataset(paths, aug, seed=0, levels=name == "uint8_levels",
                                  colour_on_device=name == "split_levels")
            indices = [i % len(paths) for i in range(count + batch)]
            it = iter(DataLoader(Subset(ds, indices), batch_size=batch, num_workers=workers,
                                 collate_fn=collate_multicrop))
            next(it)  # worker start-up left out
            start = time.perf_counter()
            for _ in it:  # what the training process receives; a GPU then normalises the levels
                pass
            seconds[name] += time.perf_counter() - start
    return {name: rounds * count / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images (recursive)")
    parser.add_argument("--images", type=int, default=200, help="images per chunk")
    parser.add_argument("--rounds", type=int, default=4, help="alternating chunks of each pipeline")
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"error: data folder not found: {args.data}")
    torch.set_num_threads(1)
    random.seed(0)
    paths = find_images(args.data)
    step = max(1, len(paths) // args.images)
    paths = paths[::step][: args.images]

    reference = ReferenceDINOAugmentation()
    ours = MultiCropDataset(paths, dinocli.create_augmentation("dino"), seed=0, on_bad_image="fail")
    split = MultiCropDataset(paths, ours.augmentation, seed=0, on_bad_image="fail", colour_on_device=True)
    decoded = [open_rgb(p) for p in paths]
    aug = ours.augmentation

    pipelines: dict[str, Callable[[int], object]] = {
        "reference": lambda i: reference(open_rgb(paths[i])),  # decode + augment, as a worker does
        "dinocli": lambda i: ours[i],
        "reference_augment_only": lambda i: reference(decoded[i]),
        "dinocli_augment_only": lambda i: aug(decoded[i], ours.generator(i)),
        "dinocli_split_worker": lambda i: split[i],  # --augment-on split: the device colours
    }
    indices = list(range(len(paths)))
    for fn in pipelines.values():  # warm-up
        fn(0)
    seconds = dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            seconds[name] += cpu_seconds(fn, indices)
    n = args.rounds * len(indices)
    rate = {name: n / s for name, s in seconds.items()}
    result = {
        "machine": machine(),
        "data": str(args.data),
        "images": len(indices),
        "rounds": args.rounds,
        "images_per_s_per_core": {k: round(v, 1) for k, v in rate.items()},
        "ratio_decode_and_augment": round(rate["dinocli"] / rate["reference"], 3),
        "ratio_augment_only": round(rate["dinocli_augment_only"] / rate["reference_augment_only"], 3),
        "ratio_split_worker": round(rate["dinocli_split_worker"] / rate["dinocli"], 3),
    }
    print(f"machine: {result['machine']}")
    print(f"{len(indices)} images from {args.data}, {args.rounds} alternating rounds, 1 thread, CPU time")
    for name, r in rate.items():
        print(f"  {name:24s} {r:8.1f} images/s per core")
    print(f"dinocli / reference (decode + augment): {result['ratio_decode_and_augment']:.2f}x")
    print(f"dinocli / reference (augment only):     {result['ratio_augment_only']:.2f}x")
    print(f"--augment-on split worker / dinocli:    {result['ratio_split_worker']:.2f}x")
    if args.workers > 0:
        torch.set_num_threads(1)
        loader = loader_rates(paths, args.workers, args.rounds)
        result["loader_images_per_s"] = {k: round(v, 1) for k, v in loader.items()}
        result["ratio_levels_over_floats"] = round(loader["uint8_levels"] / loader["float_views"], 3)
        result["ratio_split_over_floats"] = round(loader["split_levels"] / loader["float_views"], 3)
        print(f"DataLoader, {args.workers} workers (wall time): float views {loader['float_views']:.1f}, "
              f"uint8 levels {loader['uint8_levels']:.1f} ({result['ratio_levels_over_floats']:.2f}x), "
              f"split levels {loader['split_levels']:.1f} images/s ({result['ratio_split_over_floats']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
