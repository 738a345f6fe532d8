"""Benchmark: ``dino linear``'s two modes against a plain loop of the reference recipe, same run, same features.

For a backbone (``--weights``, and the same architecture at random initialisation) on an image
folder with ``train/`` and ``val/`` (cifar10_sub, imagenette224_sub):

* the cached features of train and val (centre crops; the last ``n_last_blocks`` CLS tokens);
* **fast**: :func:`dinocli.evaluate.linear_sweep` of DINOv2's 13 learning rates in one pass, the
  best picked on 10 % of train held out, then refit on all of train;
* **plain reference**: ``eval_linear.py``'s recipe written anew (``DataLoader`` over the cached
  features with a ``DistributedSampler``, ``nn.Linear`` initialised N(0, 0.01), SGD momentum 0.9,
  ``CosineAnnealingLR``, val after every epoch), run once per learning rate, 13 times in a row;
  the best of them is picked on val, an oracle the fast mode does not get;
* **dinocli reference mode** on the same cached features at lr 0.001 (must equal the plain loop
  at that lr), and with augmentation (random-resized crops through the backbone every epoch) for
  ``--image-epochs`` epochs, whose time per epoch gives the cost of the 100-epoch run.

    python benchmarks/linear.py --data ~/datasets/cifar10_sub --weights run/checkpoint.pth --crop-size 32
    python benchmarks/linear.py --data ~/datasets/cifar10_sub --random-only --arch vit_tiny --patch-size 4 --crop-size 32

It prints a table of accuracy and time per mode, the speed-up of the fast sweep over the 13 plain
runs, and the machine; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinocli.evaluate import backbone_for_eval, extract_folder, reference_resize
from dinocli.evaluate.linear import linear_reference
from dinocli.evaluate.linear_images import linear_reference_images
from dinocli.evaluate.linear_sweep import DEFAULT_LRS, linear_sweep


def plain_reference(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    num_classes: int, lr: float, epochs: int, batch_size: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """``eval_linear.py``'s recipe on cached features, written plainly (one learning rate)."""
    dataset = torch.utils.data.TensorDataset(train_x, train_y)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    layer = nn.Linear(train_x.shape[1], num_classes)
    layer.weight.data = torch.empty_like(layer.weight).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
    layer.bias.data.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr * batch_size / 256.0, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    criterion = nn.CrossEntropyLoss()
    accs = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        layer.train()
        for x, y in loader:
            loss = criterion(layer(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        layer.eval()
        with torch.no_grad():
            accs.append(100.0 * float((layer(val_x).argmax(1) == val_y).double().mean()))
    return {"lr": lr, "top1": accs[-1], "best_top1": max(accs), "weight": layer.weight.detach()}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def evaluate_backbone(name: str, model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    crop = args.crop_size
    depth = len(getattr(model, "blocks", ())) or 1
    n_last = min(args.n_last_blocks, depth)
    options = dict(resize=reference_resize(crop), crop_size=crop, n_last_blocks=n_last, batch_size=128,
                   num_workers=args.num_workers, precision="fp32", device="cpu")  # fmt: skip
    data = Path(args.data)
    (train, val), t_extract = timed(lambda: (extract_folder(model, data / "train", **options),
                                             extract_folder(model, data / "val", **options)))  # fmt: skip
    print(f"[{name}] features {train.features.shape[1]}-d of {len(train)} train + {len(val)} val images "
          f"(n_last_blocks {n_last}) in {t_extract:.1f} s", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    fast, t_fast = timed(linear_sweep, train, val, DEFAULT_LRS, device="cpu", precision="fp32", **common)
    rows.append({"backbone": name, "mode": "fast: 13-lr sweep, picked on held-out train, refit",
                 "lr": fast.lr, "top1": fast.top1, "seconds": t_fast})  # fmt: skip
    print(f"[{name}] fast sweep {t_fast:.1f} s: lr {fast.lr:g}, top-1 {fast.top1:.2f}", flush=True)
    classes = int(max(train.labels.max(), val.labels.max())) + 1
    plain, t_plain = [], 0.0
    for lr in DEFAULT_LRS:
        run, t = timed(plain_reference, train.features, train.labels, val.features, val.labels, classes, lr,
                       args.epochs, args.batch_size, args.seed)  # fmt: skip
        plain.append(run)
        t_plain += t
    best = max(plain, key=lambda r: r["top1"])
    rows.append({"backbone": name, "mode": "plain reference x13, best lr on val (oracle)",
                 "lr": best["lr"], "top1": best["top1"], "best_epoch_top1": max(r["best_top1"] for r in plain),
                 "seconds": t_plain})  # fmt: skip
    print(f"[{name}] 13 plain runs {t_plain:.1f} s: best lr {best['lr']:g}, top-1 {best['top1']:.2f}", flush=True)
    ref, t_ref = timed(linear_reference, train, val, lr=0.001, device="cpu", **common)
    at_default = next(r for r in plain if r["lr"] == 0.001)
    rows.append({"backbone": name, "mode": "dinocli reference, cached features, lr 0.001", "lr": 0.001,
                 "top1": ref.top1, "best_epoch_top1": ref.best_top1, "seconds": t_ref,
                 "plain_top1_at_lr": at_default["top1"],
                 "max_weight_difference": float((ref.classifier.weight - at_default["weight"]).abs().max())})  # fmt: skip
    if args.image_epochs > 0:
        from dinocli.data import image_folder

        paths, labels, names = image_folder(data / "train")
        aug, t_aug = timed(linear_reference_images, model, paths, labels, val, classes=names, crop_size=crop,
                           n_last_blocks=n_last, lr=0.001, epochs=args.image_epochs, batch_size=args.batch_size,
                           num_workers=args.num_workers, precision="fp32", device="cpu", seed=args.seed)  # fmt: skip
        rows.append({"backbone": name, "mode": f"dinocli reference, augmented images, {args.image_epochs} epochs",
                     "lr": 0.001, "top1": aug.top1, "seconds": t_aug,
                     "seconds_for_100_epochs": t_aug / args.image_epochs * 100})  # fmt: skip
    rows.append({"backbone": name, "speedup_fast_vs_13_plain": t_plain / t_fast,
                 "fast_minus_best_plain_top1": fast.top1 - best["top1"], "extract_seconds": t_extract})  # fmt: skip
    return rows


def machine() -> str:
    """The CPU and library versions (as benchmarks/augment.py prints them), and the threads in use."""
    from augment import machine as cpu_and_versions  # benchmarks/ is on sys.path when run as a script

    return f"{cpu_and_versions()}; {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/ and val/ (ImageFolder)")
    parser.add_argument("--weights", help="a dinocli checkpoint (its teacher); the same arch at random init also runs")
    parser.add_argument("--random-only", action="store_true", help="only a randomly initialised --arch")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=None, help="--random-only: the ViT's blocks")
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--n-last-blocks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-epochs", type=int, default=1, help="epochs of the augmented reference mode (0: skip)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = []
    if args.weights and not args.random_only:
        trained, info = backbone_for_eval(args.weights)
        spec = info["backbone"]
        backbones.append(("trained", trained))
        random_init, _ = backbone_for_eval(random_init=True, arch=spec["name"], seed=args.seed,
                                           **_random_init_options(spec.get("kwargs", {})))  # fmt: skip
    else:
        random_init, _ = backbone_for_eval(random_init=True, arch=args.arch, patch_size=args.patch_size,
                                           img_size=args.crop_size, seed=args.seed, depth=args.depth)  # fmt: skip
    backbones.append(("random init", random_init))
    rows = []
    for name, model in backbones:
        rows += evaluate_backbone(name, model, args)
    print(f"\nlinear evaluation on {args.data} ({args.epochs} epochs, batch {args.batch_size}); {machine()}")
    print(f"{'backbone':12} {'mode':58} {'lr':>7} {'top-1 %':>8} {'seconds':>9}")
    for row in rows:
        if "mode" in row:
            print(f"{row['backbone']:12} {row['mode']:58} {row['lr']:7g} {row['top1']:8.2f} {row['seconds']:9.1f}")
        else:
            print(f"{row['backbone']:12} fast sweep {row['speedup_fast_vs_13_plain']:.1f}x faster than 13 plain runs; "
                  f"top-1 {row['fast_minus_best_plain_top1']:+.2f} points against their best")  # fmt: skip
    for row in rows:
        if "max_weight_difference" in row:
            print(f"{row['backbone']:12} dinocli reference vs plain loop at lr 0.001: top-1 {row['top1']:.2f} vs "
                  f"{row['plain_top1_at_lr']:.2f}, weights differ by at most {row['max_weight_difference']:.1e}")  # fmt: skip
        if "seconds_for_100_epochs" in row:
            print(f"{row['backbone']:12} augmented reference mode: {row['seconds_for_100_epochs'] / 60:.1f} min "
                  "for eval_linear.py's 100 epochs at this speed")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip


def _random_init_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """backbone_for_eval's --random-init options for a checkpoint's backbone kwargs."""
    names = {"patch_size": "patch_size", "img_size": "img_size", "patch_embed": "patch_embed", "pool": "pool",
             "depth": "depth"}  # fmt: skip
    return {names[k]: v for k, v in kwargs.items() if k in names}


if __name__ == "__main__":
    main()
