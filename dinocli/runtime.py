"""Device and precision choices shared by training and evaluation, and the data-loading workers
that feed them."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

import torch

from dinocli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
T = TypeVar("T")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> this process's CUDA device (``LOCAL_RANK`` under torchrun), else MPS, else CPU."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def usable_cpus() -> int:
    """CPU cores for this process: its affinity mask (a container's or a job scheduler's share,
    not the machine's count), shared among the processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, cores // max(1, local))


def training_workers(device: torch.device, augment_on: str) -> int:
    """Data-loading workers of ``dino pretrain --num-workers -1``, one core left to this process.

    Every other core when the workers augment for a GPU (``--augment-on cpu``: they are what limits
    such a run, ~115 images/s per core for 500x375 JPEGs; ``split``: ~330); else at most 10 (on a CPU
    device they take cores from the model; with ``--augment-on gpu`` they only read bytes).
    """
    spare = max(1, usable_cpus() - 1)
    return spare if device.type == "cuda" and augment_on in ("cpu", "split") else min(10, spare)


class TimedIterator(Generic[T]):
    """The items of ``iterable``, adding up the seconds spent waiting for each to arrive: how long
    the training process waited for its data-loading workers (:meth:`take`)."""

    def __init__(self, iterable: Iterable[T]) -> None:
        self._items: Iterator[T] = iter(iterable)
        self.waited = 0.0

    def __iter__(self) -> TimedIterator[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.waited += time.perf_counter() - start

    def take(self) -> float:
        """The seconds waited since the last call (or the start)."""
        waited, self.waited = self.waited, 0.0
        return waited


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """The concrete precision for ``device``: ``auto`` picks the fastest mode that trains safely."""
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on this device")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
