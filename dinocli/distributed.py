"""Thin helpers over :mod:`torch.distributed` that are no-ops in a single process.

A run joins the process group that ``torchrun`` describes (NCCL on CUDA, gloo on the CPU) with
:func:`init_distributed` and leaves it with :func:`destroy_distributed`. Every collective here is
called by all processes at the same point of the program, or by none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from dinocli.errors import DinoError, UsageError
from dinocli.runtime import resolve_device

#: Environment variable: seconds a collective may wait for the other processes (default 600).
TIMEOUT_ENV = "DINOCLI_DIST_TIMEOUT"

_owned_group = False  # True when init_distributed created the default process group
_host: tuple[object, object] | None = None  # (the default group, its gloo twin: _host_group)


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier()


def host_max(values: list[int]) -> list[int]:
    """Element-wise maximum over all processes of integers the host holds.

    Over gloo, never the device: with NCCL a collective on a CUDA tensor would first wait for
    every kernel already queued (a host-device sync per call), so these go through a gloo group of
    the same processes (:func:`_host_group`).
    """
    t = torch.tensor(values, dtype=torch.int64)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return t.tolist()


def _host_group() -> object | None:
    """A gloo group of every process (``None``: the default group, when it is gloo already).

    Created by every process at its first host agreement, which all processes reach together.
    """
    global _host
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _host is None or _host[0] is not world:
        _host = (world, dist.new_group(backend="gloo"))
    return _host[1]


def all_processes(flag: bool) -> bool:
    """True when ``flag`` is true on every process (read on the host, never waiting for the device)."""
    return host_max([0 if flag else 1])[0] == 0


def same_on_all_processes(value: int) -> bool:
    """True when every process passes the same integer ``value``."""
    high, low = host_max([value, -value])
    return high == -low


@dataclass(frozen=True)
class StepAgreement:
    """What all processes agree on after one training step's forward pass."""

    loss: float  # the mean loss over every sample of the global batch
    finite: bool  # the loss was finite on every process
    stop: bool  # at least one process was asked to stop (Ctrl-C)


def agree_on_step(loss: torch.Tensor, n_samples: int, stop: bool = False) -> torch.Tensor:
    """One all-reduce per step: the global mean loss, whether it is finite everywhere, and a stop.

    Called by every process before the backward pass, so that a non-finite loss or an interruption
    on one process is seen by all of them at the same iteration instead of leaving the others
    waiting in the gradient all-reduce. Returns the agreement still on the device (``[loss x
    samples, samples, non-finite processes, stops]``, summed over processes): nothing waits for
    the device until :func:`read_agreements` reads it, so the host can queue the next step first.
    """
    dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
    loss = loss.detach().to(dtype).reshape(())
    finite = torch.isfinite(loss)
    # new_full fills on the device; torch.tensor(x, device="cuda") copies from the host and waits.
    stats = torch.stack([
        torch.where(finite, loss * n_samples, loss),  # a non-finite loss stays inf or nan
        loss.new_full((), float(n_samples)),
        (~finite).to(dtype),
        loss.new_full((), float(stop)),
    ])
    return all_reduce_sum(stats)


def read_agreements(pending: list[torch.Tensor]) -> list[StepAgreement]:
    """The :func:`agree_on_step` results of several steps, read with one host-device sync."""
    if not pending:
        return []
    out = []
    for total, count, bad, stops in torch.stack(pending).tolist():
        out.append(StepAgreement(loss=total / max(count, 1.0), finite=bad == 0, stop=stops > 0))
    return out


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        value = os.environ[name]
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_name: str = "auto") -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``), if any.

    NCCL on CUDA, gloo on the CPU. Without torchrun's variables this is a single process. Each
    process uses the CUDA device ``LOCAL_RANK`` (with ``--device auto`` or ``cuda``).
    """
    global _owned_group
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return ProcessGroup(), resolve_device(device_name)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device_name in ("auto", "cuda"):
            if local_rank >= torch.cuda.device_count():
                raise UsageError(
                    f"process {rank} has LOCAL_RANK {local_rank} but this machine has only "
                    f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None
        )
        _owned_group = True
    return ProcessGroup(rank, world, local_rank), device


def destroy_distributed() -> None:
    """Leave the process group :func:`init_distributed` created (a no-op otherwise)."""
    global _owned_group, _host
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()  # and every group made from it
    _owned_group, _host = False, None


def require_not_under_torchrun() -> None:
    """A one-line error in a process that torchrun started: it cannot start processes of its own."""
    if "RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError("--nproc-per-node cannot be used under torchrun, which started the processes")


def launch_local_processes(nproc_per_node: int, module_args: list[str]) -> None:
    """Run ``python -m dinocli MODULE_ARGS`` in ``nproc_per_node`` processes under torchrun.

    A single machine (torchrun's ``--standalone`` rendezvous); for several machines run torchrun
    yourself (see docs/distributed.md). Ctrl-C reaches every process (each saves, then stops).
    Failing processes raise a one-line :class:`DinoError` with their exit code.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    require_not_under_torchrun()
    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    # torchrun would set 1 thread per process; share the CPU cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    args = parse_args(
        ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "dinocli", *module_args]
    )
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # the processes' own errors and the summary below say it
    try:
        run(args)
    except SignalException as exc:
        raise KeyboardInterrupt from exc
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        if first.exitcode in (130, -signal.SIGINT):
            raise KeyboardInterrupt from None
        error = UsageError if first.exitcode == UsageError.exit_code else DinoError
        raise error(
            f"distributed training stopped: process {first_rank} failed first (exit code "
            f"{first.exitcode}; its error is printed above)"
        ) from None
    finally:
        elastic_log.setLevel(level)


# -- randomness that does not depend on the number of processes ---------------------------------


@dataclass(frozen=True)
class _GlobalBatchNoise:
    generator: torch.Generator
    local_batch: int
    rank: int
    world_size: int


_noise: contextvars.ContextVar[_GlobalBatchNoise | None] = contextvars.ContextVar(
    "dinocli_global_batch_noise", default=None
)


def step_seed(seed: int, iteration: int) -> int:
    """A 63-bit seed for the per-sample noise of training iteration ``iteration``."""
    entropy = [int(seed) % 2**64, int(iteration), 0x5EED]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1


@contextlib.contextmanager
def global_batch_noise(
    seed: int, local_batch: int, device: torch.device, group: ProcessGroup | None = None
) -> Iterator[None]:
    """Per-sample random masks (:func:`keep_mask`) drawn as one process with the global batch would.

    Inside this block every process draws the noise of the WHOLE global batch from a generator
    seeded alike everywhere, and keeps its own rows. Batches are laid out as
    ``[views x local_batch]`` rows, and process ``r`` holds samples ``r * local_batch`` onwards of
    each view (as :class:`dinocli.train.sampler.EpochSampler` shards them); so N processes with
    batch B/N get exactly the masks one process with batch B gets.
    """
    group = group or ProcessGroup(rank(), world_size())
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a device without its own generators: the global generator is used
        yield
        return
    token = _noise.set(_GlobalBatchNoise(generator, local_batch, group.rank, group.world_size))
    try:
        yield
    finally:
        _noise.reset(token)


def keep_mask(rows: int, keep_prob: float, like: torch.Tensor) -> torch.Tensor:
    """A ``[rows]`` Bernoulli(``keep_prob``) mask of 0s and 1s in ``like``'s dtype and device.

    Inside :func:`global_batch_noise` (and outside ``torch.compile``d code) it is this process's
    share of the global batch's mask; elsewhere it comes from the global random generator.
    """
    noise = _noise.get()
    compiling = torch.compiler.is_compiling()
    if (
        noise is None
        or compiling
        or rows % noise.local_batch
        or noise.generator.device.type != like.device.type
    ):
        mask = torch.empty(rows, device=like.device).bernoulli_(keep_prob)
        return mask.to(like.dtype)
    views = rows // noise.local_batch
    full = torch.empty(views * noise.world_size * noise.local_batch, device=like.device)
    full.bernoulli_(keep_prob, generator=noise.generator)
    mine = full.view(views, noise.world_size, noise.local_batch)[:, noise.rank]
    return mine.reshape(rows).to(like.dtype)
