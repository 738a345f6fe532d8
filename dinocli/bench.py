"""``dino bench``: is training limited by the data pipeline or by the model, on this machine?

Five rates, in images per second: decoding alone (one process), decoding + multi-crop augmentation
in one process (what one data-loading worker does, one thread), the same through a ``DataLoader``
with N workers, training steps of the chosen model (the real :meth:`Trainer.step`: student
and teacher forward, DINO loss, backward, optimiser and EMA update) on a real augmented batch, and
end to end: files through the ``DataLoader`` with N workers into ``Trainer.step`` (with
``--augment-on gpu`` the step also decodes and augments, so the per-worker rate is only reading;
with ``split`` the step colours, so the per-worker rate is decoding, cropping and resizing).
The slower of the data rate and the step rate limits training; the number of workers that feeds
the model is ``ceil(1.1 * step rate / rate per worker)``, at most the number of CPUs.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinocli.data import DECODE_ERRORS, list_images, open_rgb, quiet_large_images
from dinocli.errors import UsageError
from dinocli.runtime import TimedIterator, usable_cpus

#: The keys ``dino bench --json`` prints, in this order.
JSON_KEYS = (
    "decode_images_per_s",
    "augment_images_per_s_per_worker",
    "augment_images_per_s",
    "step_images_per_s",
    "end_to_end_images_per_s",
    "bottleneck",
    "recommended_num_workers",
)
MARGIN = 1.1  # workers feed 10 % more than the model takes


@dataclass
class BenchResult:
    """The measured rates (images/s), the verdict, and what was measured."""

    decode_images_per_s: float
    augment_images_per_s_per_worker: float
    augment_images_per_s: float
    step_images_per_s: float
    end_to_end_images_per_s: float
    bottleneck: str
    recommended_num_workers: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Exactly the keys of :data:`JSON_KEYS`."""
        values = asdict(self)
        return {k: values[k] for k in JSON_KEYS}


def recommend_workers(step_rate: float, per_worker: float, cpus: int | None = None) -> int:
    """Workers that feed ``step_rate`` images/s at ``per_worker`` each, with a 10 % margin."""
    cpus = cpus or usable_cpus()
    if per_worker <= 0:
        return cpus
    return max(1, min(cpus, math.ceil(MARGIN * step_rate / per_worker)))


@dataclass
class DecodeRate:
    """What :func:`decode_rate` measured."""

    images_per_s: float  # of the files that decode
    undecodable: list[str]  # the files that do not (training skips them)


def decode_rate(paths: list[Path], limit_s: float = 5.0) -> DecodeRate:
    """Images/s of decoding to RGB in this process (stops after ``limit_s`` seconds); files that
    cannot be decoded are counted apart, as training skips them."""
    start, n, undecodable = time.perf_counter(), 0, []
    with quiet_large_images():
        for path in paths:
            try:
                open_rgb(path)
                n += 1
            except DECODE_ERRORS:
                undecodable.append(str(path))
            if time.perf_counter() - start > limit_s:
                break
    return DecodeRate(n / (time.perf_counter() - start), undecodable)


def worker_rate(dataset, count: int, limit_s: float = 10.0) -> float:
    """Images/s of ``dataset[i]`` (decode + augment) in this process on one thread, as a worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run one thread each
    try:
        dataset[0]  # warm-up
        start, n = time.perf_counter(), 0
        for i in range(count):
            dataset[i % len(dataset)]
            n += 1
            if time.perf_counter() - start > limit_s:
                break
        return n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def loader_rate(dataset, num_workers: int, batch_size: int, count: int) -> float:
    """Images/s through a ``DataLoader`` with ``num_workers`` workers (after its first batch)."""
    from dinocli.data.multicrop_dataset import collate_multicrop

    indices = [i % len(dataset) for i in range(count + batch_size)]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
        prefetch_factor=2 if num_workers else None,
    )
    it = iter(loader)
    next(it)  # worker start-up is not part of the rate
    start, n = time.perf_counter(), 0
    for batch in it:
        n += n_images(batch.crops)
    return n / max(time.perf_counter() - start, 1e-9)


def step_rate(trainer, batch, steps: int) -> float:
    """Images/s of ``trainer.step`` on ``batch`` (the same batch each time; one warm-up step)."""
    temp, momentum = trainer.schedules.teacher_temp(0), trainer.schedules.momentum(0)
    trainer.step(batch, temp, momentum, diagnose=False)
    trainer.settle()
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch, temp, momentum, diagnose=False)
    trainer.settle()
    _sync(trainer.device)
    return steps * n_images(batch) / (time.perf_counter() - start)


@dataclass
class EndToEnd:
    """What :func:`end_to_end_rate` measured."""

    images_per_s: float
    data_wait_share: float  # of the timed seconds, the share spent waiting for the next batch
    losses: list[float]


def end_to_end_rate(trainer, dataset, num_workers: int, batch_size: int, steps: int) -> EndToEnd:
    """Images/s from files to the end of ``trainer.step``: a ``DataLoader`` with ``num_workers``
    workers feeding the training steps (after one warm-up batch, so worker start-up is left out);
    the share of that time the training process waited for the workers (near 1: data-bound; near
    0: the step limits); and the losses of the timed steps."""
    from dinocli.data.multicrop_dataset import collate_multicrop

    indices = [i % len(dataset) for i in range((steps + 1) * batch_size)]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
        pin_memory=trainer.device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
    )
    temp, momentum = trainer.schedules.teacher_temp(0), trainer.schedules.momentum(0)
    it = iter(loader)
    trainer.step(next(it).crops, temp, momentum, diagnose=False)
    trainer.settle()
    _sync(trainer.device)
    batches = TimedIterator(it)
    start, n, losses = time.perf_counter(), 0, []
    for batch in batches:
        if n_images(batch.crops):
            losses += trainer.step(batch.crops, temp, momentum, diagnose=False)[0]
            n += n_images(batch.crops)
    losses += trainer.settle()
    _sync(trainer.device)
    seconds = max(time.perf_counter() - start, 1e-9)
    return EndToEnd(n / seconds, min(batches.take() / seconds, 1.0), losses)


def n_images(crops) -> int:
    """Images in a collated batch's views (a list of ``[B, 3, h, w]``, or encoded images)."""
    if hasattr(crops, "finish"):
        return len(crops)
    return int(crops[0].shape[0]) if crops else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    data: str | Path | None = None,
    config: str | Path | None = None,
    images: int = 200,
    steps: int = 5,
    **options: Any,
) -> BenchResult:
    """Measure the four rates on the images under ``data`` and say what limits training.

    ``options`` are ``dino pretrain`` options (``arch="vit_small"``, ``recipe="auto"``,
    ``augment_on="split"`` ...), over the TOML ``config`` file, over the defaults: the step timed is
    that run's. ``data`` defaults to the config's."""
    from dinocli.data.multicrop_dataset import collate_multicrop
    from dinocli.distributed import ProcessGroup
    from dinocli.runtime import resolve_device, resolve_precision, training_workers
    from dinocli.train.config import resolve_config
    from dinocli.train.loop import Trainer

    if images < 1 or steps < 1 or (options.get("batch_size") or 1) < 1:
        raise UsageError("--images, --steps and --batch-size must be positive")
    overrides = {k: v for k, v in options.items() if v is not None}
    if data is not None:
        overrides["data"] = str(data)
    with tempfile.TemporaryDirectory(prefix="dino-bench-") as out:
        # one epoch without warm-up: the step's cost does not depend on the schedules
        overrides.update(output=out, epochs=1, warmup_epochs=0, progress=False)
        cfg = resolve_config(config, overrides)
        if not cfg.data:
            raise UsageError("give --data, or a --config that names the data")
        paths = list_images(cfg.data)  # files or tar shard members
        cpus = usable_cpus()
        batch_size = min(cfg.batch_size, len(paths))
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
        dev = resolve_device(cfg.device)
        augment_on = cfg.augment_on
        workers = cfg.num_workers if cfg.num_workers >= 0 else training_workers(dev, augment_on)
        trainer = Trainer(cfg, ProcessGroup(), dev, resolve_precision(cfg.precision, dev), False)
        try:
            dataset = trainer.make_dataset(seed=0)
            decode = decode_rate(paths[:images])
            per_worker = worker_rate(dataset, images)
            with_workers = loader_rate(dataset, workers, min(batch_size, 16), images)
            batch = collate_multicrop([dataset[i % len(dataset)] for i in range(batch_size)])
            if not batch.crops:
                raise UsageError(f"no image under {cfg.data} could be decoded")
            step = step_rate(trainer, batch.crops, steps)
            end_to_end = end_to_end_rate(trainer, dataset, workers, batch_size, steps)
            split = None  # where the workers limit: their rate with the colour left to the device
            if with_workers < step and augment_on == "cpu":
                split = split_worker_rate(trainer, images)
        finally:
            trainer.close()
    recommended = recommend_workers(step, per_worker, cpus)
    return BenchResult(
        decode_images_per_s=round(decode.images_per_s, 1),
        augment_images_per_s_per_worker=round(per_worker, 1),
        augment_images_per_s=round(with_workers, 1),
        step_images_per_s=round(step, 1),
        end_to_end_images_per_s=round(end_to_end.images_per_s, 1),
        bottleneck="data" if with_workers < step else "model",
        recommended_num_workers=recommended,
        details={
            "arch": cfg.arch, "patch_size": cfg.patch_size, "device": str(dev), "precision": trainer.precision,
            "num_workers": workers, "batch_size": batch_size, "augment_on": augment_on,
            "images": len(paths), "cpus": cpus, "data_wait_share": round(end_to_end.data_wait_share, 3),
            "split_images_per_s_per_worker": None if split is None else round(split, 1),
            "undecodable": decode.undecodable,
        },  # fmt: skip
    )


def split_worker_rate(trainer, count: int) -> float | None:
    """:func:`worker_rate` of the run's images with ``--augment-on split`` (the colour left to the
    device); None for an augmentation that cannot split."""
    from dinocli.data.multicrop_dataset import MultiCropDataset

    try:
        dataset = MultiCropDataset(trainer.paths, trainer.augmentation, colour_on_device=True)
    except UsageError:
        return None
    return worker_rate(dataset, count)


__all__ = [
    "JSON_KEYS", "BenchResult", "DecodeRate", "EndToEnd", "end_to_end_rate", "recommend_workers", "run_bench",
]
