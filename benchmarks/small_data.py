"""Recipes on small data: teacher k-NN top-1 after the same wall-clock budget on this machine.

    python benchmarks/small_data.py [--minutes 40] [--data ../shared/datasets/cifar10_sub]
        [--recipes reference small-data auto] [--output runs/small-data-bench]

For each recipe: a short probe measures the time per iteration, the number of epochs that fits in
the budget is set with ``--epochs`` (so each recipe's schedules fit its run), the run trains, and
the teacher's k-NN top-1 (k=20, val against train) is measured with the code of ``dino knn``. The
same network at random initialisation and raw pixels are measured in the same run. ``reference``
gets the sizes the reference recipe needs for 32-px images (ViT-Tiny/4, 32/16-px crops, 6 local
crops, 4096 prototypes), as in the recipes issue. Prints one table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

import dinocli
from dinocli.distributed import ProcessGroup
from dinocli.evaluate import backbone_for_eval, extract_folder, knn_features
from dinocli.train import pretrain, resolve_config
from dinocli.train.loop import Trainer

REFERENCE_SIZES = dict(arch="vit_tiny", patch_size=4, global_crop_size=32, local_crop_size=16,
                       local_crops_number=6, out_dim=4096)


def options(recipe: str, data: Path, output: Path, epochs: int | None) -> dict:
    values = {"recipe": recipe, "data": str(data / "train"), "output": str(output),
              "progress": False, "saveckp_freq": 0, "num_workers": 1}
    if recipe == "reference":
        values.update(REFERENCE_SIZES, warmup_epochs=min(10, max(1, (epochs or 10) // 10)))
    if epochs is not None:
        values["epochs"] = epochs
    return values


def seconds_per_epoch(recipe: str, data: Path, scratch: Path, probe_iters: int = 3) -> float:
    """Time a few training iterations of ``recipe`` (after one warm-up iteration)."""
    cfg = resolve_config(overrides=options(recipe, data, scratch, 100))
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "bf16" if cfg.precision == "auto" else cfg.precision)
    try:
        loader = trainer._loader()
        trainer.dataset.set_epoch(0)
        batches = iter(loader)
        views, _ = next(batches)
        trainer.step(views, 0.04, 0.99)
        start = time.perf_counter()
        for _ in range(probe_iters):
            views, _ = next(batches)
            trainer.step(views, 0.04, 0.99)
        per_iter = (time.perf_counter() - start) / probe_iters
        return per_iter * trainer.iters_per_epoch
    finally:
        trainer.close()
        shutil.rmtree(scratch, ignore_errors=True)


def knn_top1(model: torch.nn.Module, data: Path, size: int) -> float:
    opts = dict(resize=size, crop_size=size, precision="fp32")
    train = extract_folder(model, data / "train", **opts)
    val = extract_folder(model, data / "val", **opts)
    return knn_features(train, val, k=20).top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10_sub")
    parser.add_argument("--recipes", nargs="+", default=["reference", "small-data", "auto"])
    parser.add_argument("--output", type=Path, default=Path("runs/small-data-bench"))
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"data set not found: {args.data} (see ../shared/datasets/README.md)")

    rows = []
    for recipe in args.recipes:
        per_epoch = seconds_per_epoch(recipe, args.data, args.output / f"probe-{recipe}")
        epochs = max(1, int(args.minutes * 60 / per_epoch))
        run = args.output / recipe
        shutil.rmtree(run, ignore_errors=True)
        cfg = resolve_config(overrides=options(recipe, args.data, run, epochs))
        start = time.perf_counter()
        pretrain(cfg)
        train_min = (time.perf_counter() - start) / 60
        top1 = knn_top1(dinocli.load_backbone(run / "checkpoint.pth"), args.data, cfg.global_crop_size)
        rows.append({"what": recipe, "epochs": epochs, "train_min": round(train_min, 1), "knn_top1": top1,
                     "arch": f"{cfg.arch}/{cfg.patch_size}", "out_dim": cfg.out_dim,
                     "momentum": cfg.momentum_teacher, "lr": cfg.lr})
        print(json.dumps(rows[-1]), flush=True)

    random_model, _ = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32)
    rows.append({"what": "random init (vit_tiny/4)", "knn_top1": knn_top1(random_model, args.data, 32)})
    raw, _ = backbone_for_eval(raw_pixels=True, img_size=32)
    rows.append({"what": "raw pixels", "knn_top1": knn_top1(raw, args.data, 32)})

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; budget {args.minutes:g} min per recipe; data {args.data}")
    print(f"{'what':<26}{'epochs':>7}{'train min':>10}{'k-NN top-1':>12}")
    for row in rows:
        print(f"{row['what']:<26}{row.get('epochs', ''):>7}{row.get('train_min', ''):>10}"
              f"{row['knn_top1']:>11.1f}%")


if __name__ == "__main__":
    main()
