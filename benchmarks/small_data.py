"""Recipes on small data: teacher k-NN top-1 after the same wall-clock budget on this machine.

    python benchmarks/small_data.py [--minutes 40] [--data ../shared/datasets/cifar10_sub]
        [--recipes reference small-data auto] [--output runs/small-data-bench] [--curve]
        [--eval-size PX|RESIZE/CROP [...]] [--set KEY=VALUE ...]

For each recipe: a short probe measures the time per iteration, the number of epochs that fits in
the budget is set with ``--epochs`` (so each recipe's schedules fit its run), the run trains, and
the teacher's k-NN top-1 (k=20, val against train) is measured with the code of ``dino knn`` at
each ``--eval-size``: ``PX``, the whole images resized to PX; ``RESIZE/CROP``, resized to RESIZE
and centre-cropped to CROP. By default three: the whole images at the data set's own size (32 for
cifar10_sub) and at the size matched to the trained recipes' global crops
(:func:`dinocli.evaluate.matched_eval_size`, 40 px for 32-px crops of 35-100 %: objects then look
as large as in training), and the reference's evaluation transform at the data set's size (resize
by 256/224, centre crop: 37/32, as ``dino pretrain --knn-every`` and ``--curve`` measure). Every
row is measured in every way, whatever crop size a recipe trains on. A recipe that resolves to
the same configuration as one before it (``auto`` may choose exactly what ``small-data`` sets) is
not trained again: its row says so and repeats that result. The same network at random
initialisation and raw pixels are measured in the same run. ``reference`` gets the sizes the
reference recipe needs for 32-px images (ViT-Tiny/4 of 12 blocks, 32/16-px crops, 6 local crops,
4096 prototypes), as in the recipes issue. Prints one table and the machine.

``--curve`` also measures the k-NN after every epoch (as ``dino pretrain --knn-every 1`` does:
37-px resize, 32-px centre crop) and prints each recipe's curve against its training minutes; the
evaluations' own time is not counted as training. ``--curve --set knn_every=N`` measures it every
N epochs instead.

``--set KEY=VALUE`` (repeatable; a TOML value, or a bare word for strings) overrides an option in
every recipe, as the command line of ``dino pretrain`` would: ``--set arch=resnet18 --set
optimizer=lars`` probes a variant under the same budget. The random-initialisation row is measured
for each distinct backbone that was trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import dinocli
from dinocli.distributed import ProcessGroup
from dinocli.errors import UsageError
from dinocli.evaluate import (
    backbone_for_eval,
    extract_folder,
    knn_features,
    matched_eval_size,
    reference_resize,
)
from dinocli.recipes import describe_data
from dinocli.train import PretrainConfig, pretrain, resolve_config
from dinocli.train.loop import Trainer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REFERENCE_SIZES = dict(arch="vit_tiny", patch_size=4, global_crop_size=32, local_crop_size=16,
                       local_crops_number=6, out_dim=4096)


def parse_set(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value read as TOML (``0.3``, ``[0.2, 1.0]``, ``true``), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key == "epochs":
        raise argparse.ArgumentTypeError("the budget sets --epochs; use --minutes")
    try:
        return key, tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return key, raw.strip()


def options(recipe: str, data: Path, output: Path, epochs: int | None, curve: bool = False,
            sets: dict | None = None) -> dict:
    values = {"recipe": recipe, "data": str(data / "train"), "output": str(output),
              "progress": False, "saveckp_freq": 0, "num_workers": 1}
    if curve:
        values["knn_every"] = 1
    if recipe == "reference":
        values.update(REFERENCE_SIZES, warmup_epochs=min(10, max(1, (epochs or 10) // 10)))
    values.update(sets or {})
    if values.get("knn_every"):  # the curve's k-NN: val against train of the benchmark's data set
        values.setdefault("knn_train", str(data / "train"))
        values.setdefault("knn_val", str(data / "val"))
    if epochs is not None:
        values["epochs"] = epochs
    return values


def seconds_per_epoch(recipe: str, data: Path, scratch: Path, probe_iters: int = 10, warmup_iters: int = 3,
                      sets: dict | None = None) -> float:
    """Time ten training iterations of ``recipe`` after three warm-up ones (the first few are slower:
    three timed after one warm-up fitted 11 epochs of 24-px crops where 12 took 38.9 minutes)."""
    cfg = resolve_config(overrides=options(recipe, data, scratch, 100, sets=sets))
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "bf16" if cfg.precision == "auto" else cfg.precision)
    try:
        loader = trainer._loader()
        trainer.dataset.set_epoch(0)
        batches = iter(loader)
        for _ in range(warmup_iters):
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


def signature(cfg: PretrainConfig) -> str:
    """What makes two runs the same: every option except the recipe's name and the run folder."""
    values = dataclasses.asdict(cfg)
    values.pop("recipe"), values.pop("output")
    return json.dumps(values, sort_keys=True, default=str)


def training_curve(history: list[dict]) -> list[tuple[int, float, float]]:
    """``(epoch, training minutes so far, k-NN top-1)`` after each epoch, from a run's history."""
    minutes, knn, curve = 0.0, {}, []
    for record in history:
        if record.get("summary") == "knn":
            knn[record["epoch"]] = record["knn_top1"]
    for record in history:
        if record.get("summary") == "epoch":
            minutes += record["epoch_time_s"] / 60
            if record["epoch"] in knn:
                curve.append((record["epoch"] + 1, round(minutes, 1), knn[record["epoch"]]))
    return curve


def parse_view(text: str) -> tuple[int, int]:
    """``PX`` (the whole image at PX) or ``RESIZE/CROP`` of ``--eval-size``, as ``(resize, crop)``."""
    resize, slash, crop = text.partition("/")
    try:
        view = (int(resize), int(crop if slash else resize))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PX or RESIZE/CROP, got {text!r}") from None
    if not 0 < view[1] <= view[0]:
        raise argparse.ArgumentTypeError(f"expected 0 < CROP <= RESIZE, got {text!r}")
    return view


def view_label(view: tuple[int, int]) -> str:
    """``32`` for the whole image at 32 px, ``37/32`` for a 32-px centre crop of a 37-px resize."""
    return str(view[1]) if view[0] == view[1] else f"{view[0]}/{view[1]}"


def knn_top1(model: torch.nn.Module, data: Path, view: tuple[int, int]) -> float:
    opts = dict(resize=view[0], crop_size=view[1], precision="fp32")
    train = extract_folder(model, data / "train", **opts)
    val = extract_folder(model, data / "val", **opts)
    return knn_features(train, val, k=20).top1


def matched_size(cfg: PretrainConfig) -> int:
    """The whole-image size at which objects look as large as in ``cfg``'s global crops."""
    patches = cfg.patch_size if cfg.arch.startswith("vit") else 1
    return matched_eval_size(cfg.global_crop_size, cfg.global_crops_scale, patches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10_sub")
    parser.add_argument("--recipes", nargs="+", default=["reference", "small-data", "auto"])
    parser.add_argument("--output", type=Path, default=Path("runs/small-data-bench"))
    parser.add_argument("--eval-size", type=parse_view, nargs="+", metavar="PX|RESIZE/CROP",
                        help="k-NN of every row on the whole images resized to PX, or resized to RESIZE and "
                             "centre-cropped to CROP (default: the data set's own size, the size matched to the "
                             "trained recipes' global crops, and the reference transform at the data set's size)")
    parser.add_argument("--curve", action="store_true",
                        help="k-NN after every epoch of each trained recipe (every N with --set knn_every=N)")
    parser.add_argument("--set", dest="sets", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                        help="override an option in every recipe (repeatable), e.g. --set arch=resnet18")
    args = parser.parse_args()
    sets = dict(args.sets)
    variant = "".join(f" {k}={v}" for k, v in sets.items())
    if not (args.data / "train").is_dir():
        raise SystemExit(f"data set not found: {args.data} (see ../shared/datasets/README.md)")
    try:  # unknown recipes, unknown options and values of the wrong type, before anything trains
        resolved = {recipe: resolve_config(overrides=options(recipe, args.data, args.output, 100, sets=sets))
                    for recipe in args.recipes}
    except UsageError as exc:
        parser.error(str(exc))
    probes = {recipe: signature(cfg) for recipe, cfg in resolved.items()}
    own = describe_data(args.data / "train").image_size
    views = args.eval_size or [(size, size) for size in sorted({own, *map(matched_size, resolved.values())})]
    if not args.eval_size:
        views.append((reference_resize(own), own))
    labels = [view_label(view) for view in views]

    rows, probed, trained, curves, configs = [], {}, {}, {}, []
    for recipe in args.recipes:
        probe = probes[recipe]
        if probe not in probed:
            probed[probe] = seconds_per_epoch(recipe, args.data, args.output / f"probe-{recipe}", sets=sets)
        epochs = max(1, int(args.minutes * 60 / probed[probe]))
        run = args.output / recipe
        shutil.rmtree(run, ignore_errors=True)
        cfg = resolve_config(overrides=options(recipe, args.data, run, epochs, args.curve, sets))
        same = trained.get(signature(cfg))
        if same is not None:
            rows.append({**same, "what": f"{recipe} (= {same['what']}: same configuration, not trained again)"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        start = time.perf_counter()
        history = pretrain(cfg).history
        evaluating = sum(record["knn_time_s"] for record in history if record.get("summary") == "knn")
        train_min = (time.perf_counter() - start - evaluating) / 60
        if cfg.knn_every:
            curves[recipe] = training_curve(history)
        teacher = dinocli.load_backbone(run / "checkpoint.pth")
        top1 = {label: knn_top1(teacher, args.data, view) for label, view in zip(labels, views)}
        configs.append(cfg)
        rows.append({"what": recipe + variant, "epochs": epochs, "train_min": round(train_min, 1), "knn_top1": top1,
                     "arch": f"{cfg.arch}/{cfg.patch_size}", "out_dim": cfg.out_dim,
                     "momentum": cfg.momentum_teacher, "lr": cfg.lr})
        trained[signature(cfg)] = rows[-1]
        print(json.dumps(rows[-1]), flush=True)

    networks = dict.fromkeys((c.arch, c.patch_size, c.patch_embed, c.pool, c.depth) for c in configs)
    measured = set()
    for arch, patch_size, patch_embed, pool, depth in networks:
        random_model, _ = backbone_for_eval(
            random_init=True, arch=arch, patch_size=patch_size, img_size=views[0][1], patch_embed=patch_embed,
            pool=pool, depth=depth or None,
        )
        patched = getattr(random_model, "patch_size", None)
        name = f"{arch}/{patch_size}" if patched else arch
        name += f", {depth} blocks" if patched and depth else ""
        name += ", conv stem" if patched and patch_embed == "conv" else ""
        name += ", mean patch token" if patched and pool == "avg" else ""
        if name in measured:  # a backbone without patches ignores the patch size, depth and embedding
            continue
        measured.add(name)
        top1 = {label: knn_top1(random_model, args.data, view) for label, view in zip(labels, views)}
        rows.append({"what": f"random init ({name})", "knn_top1": top1})
    raw, _ = backbone_for_eval(raw_pixels=True, img_size=views[0][1])
    rows.append({"what": "raw pixels",
                 "knn_top1": {label: knn_top1(raw, args.data, view) for label, view in zip(labels, views)}})

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; budget {args.minutes:g} min per recipe; data {args.data}, "
          f"k-NN top-1 at {', '.join(labels)} px (PX: the whole image; RESIZE/CROP: a centre crop)")
    width = max(26, *(len(row["what"]) + 2 for row in rows))
    print(f"{'what':<{width}}{'epochs':>7}{'train min':>10}" + "".join(f"{f'@{label} px':>11}" for label in labels))
    for row in rows:
        print(f"{row['what']:<{width}}{row.get('epochs', ''):>7}{row.get('train_min', ''):>10}"
              + "".join(f"{row['knn_top1'][label]:>10.1f}%" for label in labels))
    for recipe, curve in curves.items():
        print(f"\n{recipe}, k-NN top-1 during training (epoch: training minutes, top-1):")
        print("  " + "  ".join(f"{epoch}: {minutes:g} min {top1:.1f}%" for epoch, minutes, top1 in curve))


if __name__ == "__main__":
    main()
