"""Benchmark: feature extraction from tar shards against the same images as a folder, in one run.

The images (``--data``, or ``--generate N`` JPEGs) are written to shards with
:func:`dinocli.data.write_shards`; then :func:`dinocli.evaluate.extract_features` runs over the
folder's files and over the shards' members, alternating for ``--rounds`` rounds after a warm-up
pass of each (so both read from the page cache), and the rates are compared. The default network
is none (``--raw-pixels``: the flattened crop), so the rate is the data path's -- listing, reading,
decoding, resizing, batching -- which is where folders and shards differ; ``--arch`` puts a random
ViT behind it. Also printed: the time to list the folder and to index the shards (one pass over the
tar headers, then from the index cache). Prints images/s of each, the ratio shards / folder and the machine.

    python benchmarks/shards.py --data ../shared/datasets/imagenette224_sub/train
    python benchmarks/shards.py --generate 2000            # 224-px JPEGs made here
    python benchmarks/shards.py --generate 64 --rounds 1   # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from augment import machine  # benchmarks/augment.py: the CPU and library versions
from dinocli.data import find_images, list_images, write_shards
from dinocli.evaluate.extract import backbone_for_eval, extract_features


def generate_jpegs(folder: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` px (smooth colour fields plus noise) in 10 class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b), np.cos(b * yy + c), np.sin(c * (xx + yy) + a)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        target = folder / f"class{i % 10}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="an image folder (default: --generate 1000)")
    source.add_argument("--generate", type=int, default=1000, help="this many 224-px JPEGs made here")
    parser.add_argument("--images", type=int, default=0, help="with --data: its first N images (0: all)")
    parser.add_argument("--per-shard", type=int, default=100, help="images per shard")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed passes of each")
    parser.add_argument("--arch", default=None, help="a random backbone behind the data (default: none)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dino-shards-bench-") as tmp:
        os.environ["DINOCLI_CACHE"] = str(Path(tmp) / "cache")  # the shard indexes of this run only
        root = args.data or generate_jpegs(Path(tmp) / "images", args.generate)
        if args.data and args.images:  # a subset: copied, so that the shards hold the same images
            subset = Path(tmp) / "subset"
            for path in find_images(root)[: args.images]:
                target = subset / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
            root = subset
        shards = write_shards(root, str(Path(tmp) / "shards" / "s-%06d.tar"), max_count=args.per_shard)
        start = time.perf_counter()
        files = find_images(root)
        list_s = time.perf_counter() - start
        start = time.perf_counter()
        members = list_images(Path(tmp) / "shards")  # the tar headers
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        assert list_images(Path(tmp) / "shards") == members  # the cached index
        cached_s = time.perf_counter() - start
        assert len(members) == len(files)

        if args.arch:
            model = backbone_for_eval(random_init=True, arch=args.arch, img_size=args.crop_size)[0]
        else:
            model = backbone_for_eval(raw_pixels=True)[0]
        options = dict(resize=args.resize, crop_size=args.crop_size, batch_size=args.batch_size,
                       num_workers=args.num_workers, precision="fp32", device=args.device)
        seconds = {"folder": 0.0, "shards": 0.0}
        items = {"folder": files, "shards": members}
        features = {}
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and the code
            for name in ("folder", "shards") if round_ % 2 == 0 else ("shards", "folder"):
                start = time.perf_counter()
                features[name] = extract_features(model, items[name], **options).features
                if round_:
                    seconds[name] += time.perf_counter() - start
        identical = bool(torch.equal(features["folder"], features["shards"]))

    n = len(files) * args.rounds
    rates = {name: n / s for name, s in seconds.items()}
    result = {
        "images": len(files),
        "shards": len(shards),
        "network": args.arch or "raw_pixels",
        "num_workers": args.num_workers,
        "folder_images_per_s": round(rates["folder"], 1),
        "shards_images_per_s": round(rates["shards"], 1),
        "ratio": round(rates["shards"] / rates["folder"], 3),
        "identical_features": identical,
        "list_folder_s": round(list_s, 4),
        "index_shards_s": round(index_s, 4),
        "index_shards_cached_s": round(cached_s, 4),
        "machine": machine(),
    }
    print(f"{len(files)} images, {len(shards)} shards of <= {args.per_shard}, network {result['network']}, "
          f"{args.num_workers} workers, {args.rounds} rounds")
    print(f"folder  {rates['folder']:8.1f} images/s   (listing {list_s * 1e3:.0f} ms)")
    print(f"shards  {rates['shards']:8.1f} images/s   (indexing {index_s * 1e3:.0f} ms, {cached_s * 1e3:.0f} ms cached)")
    print(f"ratio shards / folder: {result['ratio']:.3f}   identical features: {identical}")
    print(f"machine: {result['machine']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
