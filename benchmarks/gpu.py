"""Benchmark: dinocli on a GPU -- training step, feature extraction and k-NN, one table.

Training: images/s and peak GPU memory of dinocli's real training step (``Trainer.step``:
student and teacher forward, DINO loss, backward, clipping, optimiser, EMA) for vit_small/16 with
2 x 224 px + 8 x 96 px crops and 65536 prototypes, at batch 64 and 128, in bf16 and fp16 (with the
gradient scaler), with and without ``--compile``. The crops are synthetic tensors already on the
device, so data loading is left out. Extract: images/s of the backbone forward (224 px, batch 256)
and of ``extract_features`` end to end on generated JPEGs. k-NN: ``knn_classify`` on 50k x 10k
synthetic features (FAISS on the GPU when it was built with GPU support, else torch or FAISS-CPU).

    python benchmarks/gpu.py                       # the full run, about 5-7 minutes on one GPU
    python benchmarks/gpu.py --no-compile          # skip the torch.compile rows (~1 minute)
    python benchmarks/gpu.py --quick --device cpu  # seconds: checks that the script works
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinocli import create_backbone
from dinocli.distributed import ProcessGroup
from dinocli.evaluate.extract import embed, extract_features
from dinocli.evaluate.knn import knn_classify
from dinocli.runtime import autocast, resolve_device
from dinocli.train import resolve_config
from dinocli.train.loop import Trainer


@dataclass
class Settings:
    """What one benchmark run measures; ``quick`` shrinks everything to run in seconds on a CPU."""

    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    batches: tuple[int, ...] = (64, 128)
    precisions: tuple[str, ...] = ("bf16", "fp16")
    compile_modes: tuple[bool, ...] = (False, True)
    warmup_steps: int = 3
    steps: int = 10
    extract_batch: int = 256
    extract_images: int = 2048
    knn_train: int = 50_000
    knn_val: int = 10_000
    knn_dim: int = 384
    budget_s: float = 450.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def quick(cls) -> Settings:
        return cls(arch="vit_tiny", out_dim=256, global_size=32, local_size=16, local_crops=2,
                   batches=(2,), precisions=("bf16", "fp16"), compile_modes=(False,),
                   warmup_steps=1, steps=1, extract_batch=4, extract_images=8,
                   knn_train=1000, knn_val=100, knn_dim=32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def write_images(folder: Path, n: int, size: int, suffix: str = ".jpg") -> Path:
    """``n`` small generated images (noise over a gradient) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)[None, :, None]
    for i in range(n):
        pixels = np.clip(ramp + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}{suffix}")
    return folder


def bench_training(s: Settings, device: torch.device, batch: int, precision: str, compiled: bool,
                   workdir: Path) -> dict[str, Any]:
    """Images/s and peak memory of ``Trainer.step`` on synthetic multi-crop batches."""
    images = workdir / f"train-{batch}"
    if not images.exists():
        write_images(images, batch, 8, ".png")  # the trainer wants one global batch of files
    cfg = resolve_config(overrides=dict(
        data=str(images), output=str(workdir / "run"), arch=s.arch, patch_size=s.patch_size,
        out_dim=s.out_dim, global_crop_size=s.global_size, local_crop_size=s.local_size,
        local_crops_number=s.local_crops, batch_size=batch, epochs=10, warmup_epochs=1,
        precision=precision, device=str(device), compile=compiled, progress=False, num_workers=0,
    ))
    reset_memory(device)
    trainer = Trainer(cfg, ProcessGroup(), device, precision, display_rich=False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, s.global_size, s.global_size, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, s.local_size, s.local_size, generator=g) for _ in range(s.local_crops)]
    views = [v.to(device) for v in views]
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-4
    try:
        start = time.perf_counter()
        for _ in range(s.warmup_steps):
            trainer.step(views, 0.04, 0.996, diagnose=False)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(s.steps):
            loss, _ = trainer.step(views, 0.04, 0.996, diagnose=False)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        trainer.close()
    memory = peak_memory_mb(device)
    del trainer, views
    reset_memory(device)
    return {"images_per_s": batch * s.steps / seconds, "peak_memory_mb": memory,
            "warmup_s": warmup_s, "loss": loss}


@torch.no_grad()
def bench_extract(s: Settings, device: torch.device, precision: str, workdir: Path) -> dict[str, Any]:
    """Backbone forward images/s on tensors, and ``extract_features`` images/s on JPEG files."""
    model = create_backbone(s.arch, patch_size=s.patch_size, img_size=s.global_size).to(device).eval()
    x = torch.randn(s.extract_batch, 3, s.global_size, s.global_size, device=device)
    with autocast(precision, device):
        embed(model, x)
        synchronize(device)
        start = time.perf_counter()
        iters = 3
        for _ in range(iters):
            embed(model, x)
        synchronize(device)
    forward = s.extract_batch * iters / (time.perf_counter() - start)
    files = sorted(write_images(workdir / "extract", s.extract_images, s.global_size + 32).iterdir())
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    start = time.perf_counter()
    extract_features(model, files, resize=s.global_size + 32, crop_size=s.global_size,
                     batch_size=s.extract_batch, num_workers=workers, precision=precision)
    synchronize(device)
    end_to_end = len(files) / (time.perf_counter() - start)
    return {"forward_images_per_s": forward, "files_images_per_s": end_to_end, "workers": workers}


def bench_knn(s: Settings, device: torch.device) -> dict[str, Any]:
    """``knn_classify`` (k = 10, 20, 100, 200) on clustered synthetic features."""
    g = torch.Generator().manual_seed(0)
    classes = 100
    centers = torch.nn.functional.normalize(torch.randn(classes, s.knn_dim, generator=g), dim=1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=g)
        return centers[labels] + 0.5 * torch.randn(n, s.knn_dim, generator=g) / s.knn_dim**0.5, labels

    (train, ytrain), (val, yval) = draw(s.knn_train), draw(s.knn_val)
    start = time.perf_counter()
    report = knn_classify(train, ytrain, val, yval, [10, 20, 100, 200], device=device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "backend": report.backend, "top1_k20": report.result(20).top1,
            "queries_per_s": s.knn_val / seconds}


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (f"{date.today().isoformat()}; {gpu}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; torch {torch.__version__}{cuda}")


def run(s: Settings, device: torch.device, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every measurement as table rows; stops adding training rows when the time budget is spent."""
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dinocli-gpu-bench-") as tmp:
        workdir = Path(tmp)
        for compiled in s.compile_modes:
            for precision in s.precisions:
                for batch in s.batches:
                    name = (f"train {s.arch}/{s.patch_size} 2x{s.global_size}+{s.local_crops}x{s.local_size}"
                            f" b{batch} {precision}{' compile' if compiled else ''}")
                    if precision == "fp16" and device.type != "cuda":
                        rows.append({"what": name, "result": "skipped (fp16 needs CUDA)"})
                        continue
                    if time.perf_counter() - started > s.budget_s:
                        rows.append({"what": name, "result": "skipped (time budget spent)"})
                        continue
                    log(f"... {name}")
                    try:
                        r = bench_training(s, device, batch, precision, compiled, workdir)
                    except torch.cuda.OutOfMemoryError:
                        rows.append({"what": name, "result": "out of memory"})
                        reset_memory(device)
                        continue
                    mem = f", peak {r['peak_memory_mb']:.0f} MiB" if r["peak_memory_mb"] else ""
                    rows.append({"what": name, **r,
                                 "result": f"{r['images_per_s']:.0f} img/s{mem} (warm-up {r['warmup_s']:.0f}s)"})
        precision = "bf16" if device.type == "cuda" else "fp32"
        log("... extract")
        e = bench_extract(s, device, precision, workdir)
        rows.append({"what": f"extract {s.arch}/{s.patch_size} {s.global_size}px forward {precision}", **e,
                     "result": f"{e['forward_images_per_s']:.0f} img/s"})
        rows.append({"what": f"extract_features from JPEG files, {e['workers']} workers",
                     "result": f"{e['files_images_per_s']:.0f} img/s"})
        log("... k-NN")
        k = bench_knn(s, device)
        rows.append({"what": f"k-NN {s.knn_train}x{s.knn_val}x{s.knn_dim}, k=10/20/100/200", **k,
                     "result": f"{k['seconds']:.2f} s ({k['backend']}), top-1 k=20 {k['top1_k20']:.1f}%"})
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    width = max(len(r["what"]) for r in rows)
    lines = [header, "", f"| {'measurement'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {r['what'].ljust(width)} | {r['result']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--steps", type=int, help="timed training steps per row (default 10)")
    parser.add_argument("--budget-s", type=float, help="training rows stop after this many seconds (450)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":  # the memory statistics need the allocator CUDA sets up lazily
        torch.cuda.init()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = Settings.quick() if args.quick else Settings()
    if args.no_compile:
        s.compile_modes = (False,)
    if args.steps:
        s.steps = args.steps
    if args.budget_s is not None:
        s.budget_s = args.budget_s
    start = time.perf_counter()
    rows = run(s, device)
    print(table(rows, f"dinocli GPU benchmark -- {machine(device)} ({time.perf_counter() - start:.0f} s)"))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
