"""Benchmark: dinocli on a GPU -- training step, training end to end, extraction and k-NN, one table.

Everything the issue asks for, in one run (about 4-6 minutes on one H100/H200; nothing downloaded):

- train step: images/s, MFU and peak memory of dinocli's real ``Trainer.step`` (student and
  teacher forward, DINO loss, backward, clipping, fused AdamW, EMA) for vit_small/16 with
  2 x 224 px + 8 x 96 px crops and 65536 prototypes, batch 128, bf16, eager and ``--compile``, on
  synthetic tensors already on the device (data loading left out), and where its time goes
  (:func:`step_profile`: kernel time against step time, by kind of kernel);
- train end to end: generated 500x375 JPEG files -> ``DataLoader`` workers -> ``Trainer.step``,
  with the augmentation in the workers (``--augment-on cpu``), split (``split``: workers decode,
  crop and resize; colour, blur and solarisation on the GPU) and on the device (``--augment-on
  gpu``: workers read bytes; nvJPEG decode, crops, colour, blur on the GPU);
- the stochastic-depth residual ``x + drop_path(branch)`` of one block, fused
  (:func:`dinocli.backbones.vit.add_dropped_path`) against the three operations it replaces,
  forward and backward, on the activations of the global crops;
- extract: backbone forward on tensors, and ``extract_features`` from the JPEG files with the
  decoding, resize and crop on the GPU (the default on CUDA) and in the workers (PIL);
- k-NN: ``knn_classify`` on 50k x 10k synthetic features.

MFU = achieved FLOP/s over the device's dense bf16 peak (:data:`PEAK_BF16`, or ``--peak-tflops``);
the FLOPs of a step are counted by :func:`train_flops_per_image` (matrix products only: 2 per
multiply-add; the backward counts twice the forward). Every CUDA-only call is guarded, so
``--device cpu --quick`` runs the same code in a minute or two as a smoke test.

    python benchmarks/gpu.py                       # the full run
    python benchmarks/gpu.py --no-compile          # skip the torch.compile row (~2 minutes less)
    python benchmarks/gpu.py --quick --device cpu  # tiny sizes: checks that the script works
    python benchmarks/gpu.py --json out.json       # also the rows as JSON
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from dinocli import create_backbone
from dinocli.backbones.vit import VIT_ARCHS, add_dropped_path, drop_path
from dinocli.distributed import ProcessGroup
from dinocli.evaluate.extract import embed, extract_features
from dinocli.evaluate.knn import knn_classify
from dinocli.io import atomic_write_text
from dinocli.runtime import autocast, resolve_device
from dinocli.train import resolve_config
from dinocli.train.loop import Trainer


#: Dense bf16 peak FLOP/s by device name (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass
class Settings:
    """What one benchmark run measures; ``quick`` shrinks everything to run fast on a CPU."""

    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    batches: tuple[int, ...] = (128,)
    precisions: tuple[str, ...] = ("bf16",)
    compile_modes: tuple[bool, ...] = (False, True)
    warmup_steps: int = 3
    steps: int = 17  # 20 iterations with the warm-up: the losses compared, compiled against eager
    check_batch: int = 32  # the compiled-against-eager loss check (no stochastic depth)
    files: int = 4096
    file_size: tuple[int, int] = (500, 375)
    e2e_batch: int = 128
    e2e_steps: int = 20
    workers: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))
    extract_batch: int = 256
    extract_resize: int = 256
    knn_train: int = 50_000
    knn_val: int = 10_000
    knn_dim: int = 384
    decode_checks: int = 20  # decode_overwrites iterations (CUDA only)
    budget_s: float = 420.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def quick(cls) -> Settings:
        return cls(arch="vit_tiny", out_dim=256, global_size=32, local_size=16, local_crops=2,
                   batches=(4,), precisions=("bf16",), compile_modes=(False,), warmup_steps=1, steps=2, check_batch=4,
                   files=24, file_size=(64, 48), e2e_batch=4, e2e_steps=2, workers=1, extract_batch=8,
                   extract_resize=40, knn_train=1000, knn_val=100, knn_dim=32)


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


def _write_jpeg(args: tuple[Path, int, int, int]) -> None:
    path, seed, width, height = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(folder: Path, n: int, size: tuple[int, int], workers: int) -> Path:
    """``n`` generated ``width x height`` photos-like JPEGs (smooth colour fields plus grain)."""
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:05d}.jpg", i, *size) for i in range(n)]
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(_write_jpeg, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_jpeg(job)
    return folder


def backbone_flops(backbone: torch.nn.Module, size: int) -> float | None:
    """Forward FLOPs of one ``size`` px image through a dinocli ViT (None for other backbones):
    every token through each block's weight matrices, attention scores and mixing
    (``4 n^2 d`` per block), and the patch embedding."""
    blocks, patch = getattr(backbone, "blocks", None), getattr(backbone, "patch_size", None)
    if blocks is None or patch is None:
        return None
    n = (size // patch) ** 2 + 1
    d = int(backbone.embed_dim)
    weights = sum(p.numel() for p in blocks.parameters() if p.ndim == 2)
    embed = sum(p.numel() for p in backbone.patch_embed.parameters() if p.ndim == 4)
    return 2.0 * n * weights + len(blocks) * 4.0 * n * n * d + 2.0 * (n - 1) * embed


def train_flops_per_image(trainer: Trainer, s: Settings) -> float | None:
    """FLOPs of one image in a training step: the student's forward and backward (3x forward) on
    every crop, the teacher's forward on the global crops, the heads on each embedding."""
    backbone = trainer.student.backbone
    g, l = backbone_flops(backbone, s.global_size), backbone_flops(backbone, s.local_size)
    if g is None or l is None:
        return None
    head = 2.0 * sum(p.numel() for p in trainer.student.head.parameters() if p.ndim == 2)
    crops = 2 * g + s.local_crops * l + (2 + s.local_crops) * head
    return 3 * crops + 2 * (g + head)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def _mfu(images_per_s: float, flops: float | None, peak: float | None) -> float | None:
    return images_per_s * flops / peak if flops and peak else None


def _train_config(s: Settings, device: torch.device, data: Path, out: Path, batch: int, precision: str,
                  compiled: bool, augment_on: str = "cpu", workers: int = 0, **more: Any):
    return resolve_config(overrides=dict(
        data=str(data), output=str(out), arch=s.arch, patch_size=s.patch_size,
        out_dim=s.out_dim, global_crop_size=s.global_size, local_crop_size=s.local_size,
        local_crops_number=s.local_crops, batch_size=batch, epochs=10, warmup_epochs=1,
        precision=precision, device=str(device), compile=compiled, progress=False,
        num_workers=workers, augment_on=augment_on, **more,
    ))


def bench_training(s: Settings, device: torch.device, batch: int, precision: str, compiled: bool,
                   workdir: Path, **more: Any) -> dict[str, Any]:
    """Images/s, peak memory and the losses of ``Trainer.step`` on synthetic multi-crop batches
    (the same batch each step; ``more``: other options, e.g. ``drop_path_rate``)."""
    images = workdir / f"train-{batch}"
    if not images.exists():
        write_images(images, batch, 8, ".png")  # the trainer wants one global batch of files
    cfg = _train_config(s, device, images, workdir / "run", batch, precision, compiled, **more)
    reset_memory(device)
    trainer = Trainer(cfg, ProcessGroup(), device, precision, display_rich=False)
    flops = train_flops_per_image(trainer, s)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, s.global_size, s.global_size, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, s.local_size, s.local_size, generator=g) for _ in range(s.local_crops)]
    views = [v.to(device) for v in views]
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-4
    losses: list[float] = []
    try:
        start = time.perf_counter()
        for _ in range(s.warmup_steps):
            losses += trainer.step(views, 0.04, 0.996, diagnose=False)[0]
        losses += trainer.settle()
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(s.steps):
            losses += trainer.step(views, 0.04, 0.996, diagnose=False)[0]
        losses += trainer.settle()
        synchronize(device)
        seconds = time.perf_counter() - start
        trainer.step(views, 0.04, 0.996, diagnose=False)  # a loss in flight, as in the training loop
        step = functools.partial(trainer.step, views, 0.04, 0.996, diagnose=False)
        syncs = host_syncs(device, step)
        try:
            profile = step_profile(step, device, step_ms=1000 * seconds / s.steps)
        except Exception as error:  # noqa: BLE001 -- a diagnosis: the rate stands without it
            profile = {"failed": one_line(error)}
        trainer.settle()
    finally:
        trainer.close()
    memory = peak_memory_mb(device)
    del trainer, views
    reset_memory(device)
    return {"images_per_s": batch * s.steps / seconds, "peak_memory_mb": memory,
            "warmup_s": warmup_s, "loss": losses[-1], "losses": losses, "flops_per_image": flops,
            "host_syncs_per_step": syncs, "profile": profile}


def bench_residual(s: Settings, device: torch.device, precision: str, batch: int, rounds: int = 5,
                   iters: int = 10) -> dict[str, Any]:
    """One block's stochastic-depth residual on the global crops' tokens, forward and backward:
    ``add_dropped_path`` against ``x + drop_path(branch)``, the same inputs, alternating rounds
    (the best round of each)."""
    shape = (2 * batch, 1 + (s.global_size // s.patch_size) ** 2, VIT_ARCHS[s.arch][0])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x, branch, grad = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(3))
    x.requires_grad_(True)
    branch.requires_grad_(True)
    steps = {"fused": lambda: add_dropped_path(x, branch, 0.1, True),
             "three ops": lambda: x + drop_path(branch, 0.1, True)}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, forward in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                torch.autograd.grad(forward(), (x, branch), grad)
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / iters * 1e3)
    return {"shape": list(shape), "dtype": precision, "fused_ms": best["fused"],
            "three_ops_ms": best["three ops"], "speedup": best["three ops"] / best["fused"]}


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: an error in a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def host_syncs(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """How many times ``fn`` makes the host wait for the GPU (torch's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


#: What each kind of operation or kernel is, by a part of its lower-cased name (the first match wins).
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matrix products", ("gemm", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                         "aten::baddbmm", "aten::_addmm", "mkldnn_matmul")),
    ("foreach updates (optimiser, EMA, clipping)", ("adam", "foreach", "multi_tensor")),
    ("copies", ("memcpy", "memset", "aten::copy_")),
)


def kind_of(name: str) -> str:
    """The :data:`KINDS` entry ``name`` (an ATen operation or a CUDA kernel) belongs to, else "other"."""
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(part in low for part in parts)), "other")


def step_profile(step: Callable[[], Any], device: torch.device, step_ms: float, steps: int = 2,
                 top: int = 5) -> dict[str, Any]:
    """Where ``steps`` calls of ``step`` spend their time (``torch.profiler``): on CUDA the kernels'
    time per step against ``step_ms`` (the unprofiled step; well below 100 %: the GPU waits for the
    host) and kernels per step; on a CPU the time inside ATen operations. Both by :data:`KINDS`, and
    the ``top`` kernels or operations."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = prof.key_averages()
    if cuda:
        rows = [a for a in averages if a.device_type != DeviceType.CPU]  # kernels, copies, fills
        rows = rows or [a for a in averages if a.self_device_time_total > 0]  # kernels folded into their ops
        busy_us = {a.key: a.self_device_time_total for a in rows}
    else:
        busy_us = {a.key: a.self_cpu_time_total for a in averages}
    total = sum(busy_us.values())
    if cuda and not total:
        raise RuntimeError("the profiler recorded no GPU kernels (is CUPTI available?)")
    kinds: dict[str, float] = {}
    for key, us in busy_us.items():
        kinds[kind_of(key)] = kinds.get(kind_of(key), 0.0) + us / max(total, 1e-9)
    ranked = sorted(busy_us, key=busy_us.get, reverse=True)[:top]
    return {
        "busy_ms_per_step": total / 1000 / steps, "step_ms": step_ms,
        "busy_share": total / 1000 / steps / step_ms, "on": "GPU kernels" if cuda else "CPU in ATen operations",
        "kernels_per_step": sum(a.count for a in rows) / steps if cuda else None,
        "ops_per_step": sum(a.count for a in averages if a.device_type == DeviceType.CPU) / steps,
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [(key[:80], busy_us[key] / max(total, 1e-9)) for key in ranked],
    }


def profile_result(p: dict[str, Any]) -> str:
    """One line of :func:`step_profile`'s figures."""
    if "failed" in p:
        return f"failed: {p['failed']}"
    kinds = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in p["kinds"].items())
    count = (f"{p['kernels_per_step']:.0f} kernels" if p["kernels_per_step"] is not None
             else f"{p['ops_per_step']:.0f} ATen calls")
    return (f"{p['on']} {p['busy_ms_per_step']:.1f} of {p['step_ms']:.1f} ms per step "
            f"({100 * p['busy_share']:.0f}%; {count}): {kinds}")


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """``max |a_i - b_i| / |b_i|`` over two loss curves of the same length."""
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def bench_end_to_end(s: Settings, device: torch.device, files: Path, augment_on: str, precision: str,
                     workdir: Path, compiled: bool = False) -> dict[str, Any]:
    """Images/s from JPEG files to the end of ``Trainer.step`` (``dinocli.bench.end_to_end_rate``;
    with ``compiled``, its warm-up step compiles)."""
    from dinocli.bench import end_to_end_rate

    run = workdir / f"run-{augment_on}{'-compiled' if compiled else ''}"
    cfg = _train_config(s, device, files, run, s.e2e_batch, precision, compiled, augment_on, s.workers)
    reset_memory(device)
    trainer = Trainer(cfg, ProcessGroup(), device, precision, display_rich=False)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-4
    try:
        dataset = trainer.make_dataset(seed=0)  # for a GPU, workers send uint8 levels (cpu path)
        e = end_to_end_rate(trainer, dataset, s.workers, s.e2e_batch, s.e2e_steps)
        flops = train_flops_per_image(trainer, s)
    finally:
        trainer.close()
    memory = peak_memory_mb(device)
    del trainer
    reset_memory(device)
    return {"images_per_s": e.images_per_s, "peak_memory_mb": memory, "flops_per_image": flops,
            "workers": s.workers, "data_wait_share": e.data_wait_share, "losses": e.losses}


def bench_device_augment(s: Settings, device: torch.device, files: Path, augment_on: str = "gpu",
                         repeats: int = 5) -> dict[str, Any]:
    """Milliseconds per batch of the augmentation work ``--augment-on gpu`` or ``split`` leaves to
    the training process (``EncodedBatch.finish``: decode, crops, colour of every view;
    ``LevelBatch.finish``: colour): the host's time to queue it, which the training step's own
    kernels wait behind, and the time until the device is done."""
    from dinocli.data.multicrop_dataset import MultiCropDataset, collate_multicrop
    from dinocli.registry import create_augmentation
    from dinocli.train.config import augmentation_kwargs

    cfg = _train_config(s, device, files, files, s.e2e_batch, "fp32", False)
    augmentation = create_augmentation(cfg.augmentation, **augmentation_kwargs(cfg))
    dataset = MultiCropDataset(sorted(files.iterdir()), augmentation, seed=0, on_device=augment_on == "gpu",
                               colour_on_device=augment_on == "split")
    batch = collate_multicrop([dataset[i % len(dataset)] for i in range(s.e2e_batch)]).crops
    if device.type == "cuda":
        batch = batch.pin_memory()
    batch.finish(device)  # warm-up
    synchronize(device)
    host, start = [], time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        batch.finish(device)
        host.append(time.perf_counter() - t)
    synchronize(device)
    done_ms = 1000 * (time.perf_counter() - start) / repeats
    with OpCounter() as ops:
        batch.finish(device)
    return {"host_ms": 1000 * min(host), "done_ms": done_ms, "ops": ops.count, "batch": s.e2e_batch}


def decode_overwrites(decode_fn: Callable[[list[torch.Tensor]], Any], data: list[torch.Tensor],
                      device: torch.device, iterations: int = 20) -> int:
    """In how many of ``iterations`` calls ``decode_fn(data)`` (encoded JPEGs -> images on the
    CUDA ``device``) overwrote memory that kernels queued before it had still to read, the check of
    pytorch/vision#9606: one uint8 tensor per image, of its decoded size, is filled; a long kernel is
    queued, then each tensor's sum; the tensors are freed (their blocks free for the allocator, their
    reads still queued) and ``decode_fn`` is called; a wrong sum is an overwrite."""
    sizes = [int(x.numel()) for x in decode_fn(data)]
    torch.cuda.synchronize(device)
    expected = torch.tensor([n * (k % 200 + 1) for k, n in enumerate(sizes)])
    overwritten = 0
    for _ in range(iterations):
        victims = [torch.full((n,), k % 200 + 1, dtype=torch.uint8, device=device) for k, n in enumerate(sizes)]
        torch.cuda.synchronize(device)
        torch.cuda._sleep(100_000_000)  # ~50 ms: the sums below stay queued while decode_fn runs
        sums = torch.stack([v.sum() for v in victims])
        del victims
        decode_fn(data)
        overwritten += int(not torch.equal(sums.cpu(), expected))
    return overwritten


def bench_decode_safety(s: Settings, device: torch.device, files: Path) -> dict[str, Any]:
    """:func:`decode_overwrites` of torchvision's ``decode_jpeg`` called directly and of dinocli's
    :func:`dinocli.augmentations.device.decode`, on 8 of the generated JPEGs."""
    from torchvision.io import decode_jpeg

    from dinocli.augmentations.device import decode

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(files.iterdir())[:8]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        direct = decode_overwrites(lambda d: decode_jpeg(d, device=device), data, device, s.decode_checks)
    ours = decode_overwrites(lambda d: decode(d, device), data, device, s.decode_checks)
    return {"torchvision": direct, "dinocli": ours, "iterations": s.decode_checks}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations run inside it (on a GPU, about one kernel launch or copy each)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def bench_extract(s: Settings, device: torch.device, precision: str, files: Path) -> dict[str, Any]:
    """Backbone forward images/s on tensors, and ``extract_features`` images/s from the JPEG files
    with decoding on the device (CUDA only) and in the workers."""
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
    out: dict[str, Any] = {"forward_images_per_s": s.extract_batch * iters / (time.perf_counter() - start)}
    paths = sorted(files.iterdir())
    for on_device in ((True, False) if device.type == "cuda" else (False, True)):
        start = time.perf_counter()
        extract_features(model, paths, resize=s.extract_resize, crop_size=s.global_size,
                         batch_size=s.extract_batch, num_workers=s.workers, precision=precision,
                         decode_on_device=on_device)
        synchronize(device)
        out["device_decode" if on_device else "worker_decode"] = len(paths) / (time.perf_counter() - start)
    return out


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


def run(s: Settings, device: torch.device, peak: float | None = None,
        log: Callable[[str], None] = functools.partial(print, flush=True),
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every measurement as table rows; training rows stop when the time budget is spent.

    A measurement that fails (out of memory, an error) becomes a row saying so, with its traceback
    in the JSON, and the run goes on: one GPU session gets every figure it can. ``on_row`` is
    called with the rows so far after each new one (``main`` prints it and rewrites the JSON)."""
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    crops = f"2x{s.global_size}+{s.local_crops}x{s.local_size}"
    low = "bf16" if device.type == "cuda" else "fp32"

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    def measure(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """``fn()``, or None after adding the row of its failure."""
        log(f"... {name}")
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            add({"what": name, "result": "out of memory"})
        except Exception as error:  # noqa: BLE001 -- recorded, and the other measurements still run
            add({"what": name, "result": f"failed: {one_line(error)}", "traceback": traceback.format_exc()})
        reset_memory(device)
        return None

    def train_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
        mfu = _mfu(r["images_per_s"], r["flops_per_image"], peak)
        mem = f", peak {r['peak_memory_mb']:.0f} MiB" if r["peak_memory_mb"] else ""
        extra = f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
        warm = f" (warm-up {r['warmup_s']:.0f}s)" if "warmup_s" in r else ""
        if r.get("host_syncs_per_step") is not None:
            mem += f", {r['host_syncs_per_step']} host sync(s) per step"
        if "data_wait_share" in r:
            mem += f", waiting for data {100 * r['data_wait_share']:.0f}% of the time"
        return {"what": name, **r, "mfu": mfu, "result": f"{r['images_per_s']:.0f} img/s{extra}{mem}{warm}"}

    def budget_left(name: str) -> bool:
        if time.perf_counter() - started <= s.budget_s:
            return True
        add({"what": name, "result": "skipped (time budget spent)"})
        return False

    with tempfile.TemporaryDirectory(prefix="dinocli-gpu-bench-") as tmp:
        workdir = Path(tmp)
        log(f"... writing {s.files} JPEGs of {s.file_size[0]}x{s.file_size[1]}")
        files = write_jpegs(workdir / "jpeg", s.files, s.file_size, s.workers)
        for compiled in s.compile_modes:
            for precision in s.precisions:
                for batch in s.batches:
                    if device.type != "cuda":
                        precision = "fp32"  # what a CPU trains in
                    name = (f"train step {s.arch}/{s.patch_size} {crops} b{batch} {precision}"
                            f"{' compile' if compiled else ''}, synthetic tensors")
                    if budget_left(name) and (r := measure(name, functools.partial(
                            bench_training, s, device, batch, precision, compiled, workdir))):
                        add(train_row(name, r))
                        add({"what": f"where the time of that step goes{' (compiled)' if compiled else ''}",
                             **r["profile"], "result": profile_result(r["profile"])})
        name = f"stochastic-depth residual of one block, b{s.batches[0]} global crops {low}, forward + backward"
        if r := measure(name, functools.partial(bench_residual, s, device, low, s.batches[0])):
            add({"what": name, **r, "result": f"fused {r['fused_ms']:.2f} ms, three ops {r['three_ops_ms']:.2f} ms: "
                                              f"{r['speedup']:.2f}x"})
        if True in s.compile_modes:
            iters = s.warmup_steps + s.steps
            name = f"losses of {iters} iterations, compile vs eager (b{s.check_batch} {low}, no stochastic depth)"

            def compiled_against_eager() -> dict[str, Any]:
                eager, compiled = (bench_training(s, device, s.check_batch, low, c, workdir, drop_path_rate=0.0)
                                   for c in (False, True))
                return loss_row(name, compiled["losses"], eager["losses"])

            if budget_left(name) and (row := measure(name, compiled_against_eager)):
                add(row)
        for augment_on in ("gpu", "split"):
            name = (f"--augment-on {augment_on} work of the training process, b{s.e2e_batch} {crops} from "
                    f"{s.file_size[0]}x{s.file_size[1]} JPEGs")
            if budget_left(name) and (a := measure(name, functools.partial(bench_device_augment, s, device, files,
                                                                           augment_on))):
                add({"what": name, **a, "result": f"host {a['host_ms']:.1f} ms per batch ({a['ops']} ops), "
                                                  f"done after {a['done_ms']:.1f} ms"})
        end_to_end: dict[str, dict[str, Any]] = {}
        for augment_on in ("cpu", "split", "gpu"):
            name = (f"train end to end from {s.file_size[0]}x{s.file_size[1]} JPEGs, {crops} b{s.e2e_batch} {low},"
                    f" --augment-on {augment_on}, {s.workers} workers")
            if budget_left(name) and (r := measure(name, functools.partial(
                    bench_end_to_end, s, device, files, augment_on, low, workdir))):
                end_to_end[augment_on] = r
                add(train_row(name, r))
        for other in ("split", "gpu"):
            if "cpu" in end_to_end and other in end_to_end:
                add(loss_row(f"losses of the {s.e2e_steps} end-to-end iterations, --augment-on {other} vs cpu",
                             end_to_end[other]["losses"], end_to_end["cpu"]["losses"]))
        if device.type == "cuda":
            name = "decode_jpeg on CUDA with reads of freed memory still queued (vision#9606)"
            if d := measure(name, functools.partial(bench_decode_safety, s, device, files)):
                add({"what": name, **d,
                     "result": f"torchvision alone overwrote them in {d['torchvision']}/{d['iterations']} calls, "
                               f"dinocli's decode in {d['dinocli']}/{d['iterations']}"})
        name = f"extract {s.arch}/{s.patch_size} {s.global_size}px forward {low}"
        if e := measure(name, functools.partial(bench_extract, s, device, low, files)):
            add({"what": name, **e, "result": f"{e['forward_images_per_s']:.0f} img/s"})
            where = "GPU" if device.type == "cuda" else device.type
            add({"what": f"extract_features from JPEG files, decode+resize on the {where}, {s.workers} workers",
                 "result": f"{e['device_decode']:.0f} img/s"})
            add({"what": f"extract_features from JPEG files, decode+resize in the workers (PIL), {s.workers} workers",
                 "result": f"{e['worker_decode']:.0f} img/s"})
        name = f"k-NN {s.knn_train}x{s.knn_val}x{s.knn_dim}, k=10/20/100/200"
        if k := measure(name, functools.partial(bench_knn, s, device)):
            add({"what": name, **k,
                 "result": f"{k['seconds']:.2f} s ({k['backend']}), top-1 k=20 {k['top1_k20']:.1f}%"})
        fastest = max(("split", "gpu"), key=lambda a: end_to_end[a]["images_per_s"] if a in end_to_end else 0.0)
        name = (f"train end to end from {s.file_size[0]}x{s.file_size[1]} JPEGs, {crops} b{s.e2e_batch} {low},"
                f" --augment-on {fastest} --compile, {s.workers} workers")
        if True in s.compile_modes and fastest in end_to_end and budget_left(name) and (r := measure(
                name, functools.partial(bench_end_to_end, s, device, files, fastest, low, workdir, True))):
            add(train_row(name, r))  # last: the compilation may take the rest of the time
    if device.type == "cuda":
        add({"what": "peak GPU memory of the run", "result": f"{peak_memory_mb(device):.0f} MiB"})
    return rows


def loss_row(name: str, losses: list[float], reference: list[float]) -> dict[str, Any]:
    """A table row: how far one loss curve is from another (bf16 rounds to 2^-8 = 3.9e-3)."""
    d = max_relative_difference(losses, reference)
    return {"what": name, "max_relative_difference": d, "losses": losses, "reference_losses": reference,
            "result": f"max relative difference {d:.1e} (bf16 rounding 3.9e-3)"}


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
    parser.add_argument("--steps", type=int, help="timed training steps per row (default 17)")
    parser.add_argument("--budget-s", type=float, help="training rows stop after this many seconds (420)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--files", type=int, help="generated JPEG files (default 4096)")
    parser.add_argument("--workers", type=int, help="data-loading workers (default min(16, CPUs))")
    parser.add_argument("--e2e-batch", type=int, help="batch of the end-to-end rows (default 128)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, for the MFU")
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
    if args.files:
        s.files = args.files
    if args.workers is not None:
        s.workers = args.workers
    if args.e2e_batch:
        s.e2e_batch = args.e2e_batch
    peak = peak_flops(device, args.peak_tflops)
    start = time.perf_counter()

    def save(rows: list[dict[str, Any]]) -> None:
        """Print the newest row and rewrite the JSON: a run cut short keeps what it measured."""
        print(f"    {rows[-1]['what']}: {rows[-1]['result']}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps({"machine": machine(device), "complete": False, "rows": rows},
                                                    indent=2, default=str))

    rows = run(s, device, peak, on_row=save)
    print(table(rows, f"dinocli GPU benchmark -- {machine(device)} ({time.perf_counter() - start:.0f} s)"))
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": machine(device), "complete": True, "rows": rows},
                                                indent=2, default=str))


if __name__ == "__main__":
    main()
