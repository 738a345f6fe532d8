"""Benchmark: collapse strategies compared after the same CPU budget (issue 7's closing note).

Each strategy pretrains the same small ViT on the same images with the same seed, epoch after
epoch, until its process CPU time reaches ``--minutes`` (or ``--epochs`` are done; the schedules
are planned for ``--epochs``). Then the teacher's k-NN top-1 (k=20, the code of ``dino knn`` via
the training's k-NN monitor) on the labelled set, and the last logged collapse diagnostics, are
printed as a table beside the same network at random initialisation.

    python benchmarks/collapse_strategies.py --minutes 5            # cifar10_sub, 5 CPU-minutes each
    python benchmarks/collapse_strategies.py --minutes 1 --train-images 1000 --strategies none centering
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dinocli.data import image_folder
from dinocli.distributed import ProcessGroup
from dinocli.registry import create_backbone
from dinocli.train import resolve_config
from dinocli.train.knn_monitor import KnnMonitor
from dinocli.train.loop import Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10_sub"
DIAGNOSTICS = ("loss", "teacher_entropy", "teacher_prototypes", "top_prototype_share", "embedding_std",
               "effective_rank")


def subset(train: Path, per_class: int, into: Path) -> Path:
    """A folder of links to the first ``per_class`` images of each class (sorted names)."""
    paths, labels, classes = image_folder(train)
    taken: dict[int, int] = {}
    for path, label in zip(paths, labels):
        if taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        target = into / classes[label] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), target)
    return into


def train_for(strategy: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cfg = resolve_config(overrides=dict(
        data=str(data), output=str(out), arch=args.arch, patch_size=args.patch_size, out_dim=args.out_dim,
        global_crop_size=32, local_crop_size=16, local_crops_number=args.local_crops, batch_size=args.batch_size,
        epochs=args.epochs, warmup_epochs=min(2, args.epochs), warmup_teacher_temp_epochs=0, lr=args.lr,
        teacher_temp=0.04, num_workers=0, precision="fp32", progress=False, log_every=10, saveckp_freq=0,
        collapse=strategy, seed=args.seed, drop_path_rate=0.0, freeze_last_layer=1,
    ))
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "fp32", display_rich=False)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        while trainer.epoch < cfg.epochs and time.process_time() - cpu0 < args.minutes * 60:
            trainer.run(stop_after_epoch=trainer.epoch + 1)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        monitor = KnnMonitor(args.data / "train", args.data / "val", 1, 32, batch_size=256)
        knn = monitor.evaluate(trainer.teacher.backbone)
    finally:
        trainer.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "summary" not in r][-1]
    warnings = sorted({r["collapse_warning"] for r in records if r.get("collapse_warning")})
    return {"strategy": strategy, "epochs": trainer.epoch, "iterations": trainer.iteration,
            "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "knn_top1": knn["knn_top1"],
            "warnings": warnings, **{k: last.get(k) for k in DIAGNOSTICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder set with train/ and val/")
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training per strategy")
    parser.add_argument("--strategies", nargs="+",
                        default=["none", "centering", "sinkhorn-knopp", "centering,koleo", "sinkhorn-knopp,koleo"])
    parser.add_argument("--train-images", type=int, default=0, help="pretrain on the first N/classes per class")
    parser.add_argument("--epochs", type=int, default=30, help="planned epochs (schedules)")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.data = args.data.resolve()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        raise SystemExit(f"{args.data} has no train/ and val/ folders (see ../shared/datasets/README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dino-collapse-bench-"))
    try:
        data = args.data / "train"
        if args.train_images:
            classes = len(image_folder(data)[2])
            data = subset(data, max(1, args.train_images // classes), work / "subset")
        torch.manual_seed(args.seed)
        random_net = create_backbone(args.arch, patch_size=args.patch_size, img_size=32)
        random_knn = KnnMonitor(args.data / "train", args.data / "val", 1, 32, batch_size=256).evaluate(random_net)
        print(f"random init: k-NN top-1 {random_knn['knn_top1']:.2f} %", flush=True)
        rows = []
        for strategy in args.strategies:
            rows.append(train_for(strategy, data, work / strategy.replace(",", "+"), args))
            print(json.dumps(rows[-1]), flush=True)  # each result as soon as it is known
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.arch}/{args.patch_size}, out_dim {args.out_dim}, "
          f"2x32 + {args.local_crops}x16 px crops, batch {args.batch_size}, budget {args.minutes} CPU-min each")
    print(f"random init: k-NN top-1 {random_knn['knn_top1']:.2f} %")
    head = ("strategy", "epochs", "iters", "cpu s", "k-NN top-1 %", *DIAGNOSTICS, "warnings")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["strategy"], r["epochs"], r["iterations"], r["cpu_s"], f"{r['knn_top1']:.2f}",
                 *(f"{r[k]:.4g}" if isinstance(r[k], (int, float)) else "-" for k in DIAGNOSTICS),
                 ",".join(r["warnings"]) or "-"]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        args.json.write_text(json.dumps({"random_init_knn_top1": random_knn["knn_top1"], "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
