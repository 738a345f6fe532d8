"""How many data-loading workers a run uses when none is given (``--num-workers -1``), and how
long the training process waits for them."""

from __future__ import annotations

import os
import time

import pytest
import torch

from dinocli.runtime import TimedIterator, training_workers, usable_cpus

from conftest import make_rgb_image

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture()
def cores(monkeypatch):
    """Pretend this process may run on ``n`` cores (its affinity mask), torchrun absent."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    return set_cores


def test_cores_are_the_affinity_mask_shared_by_the_processes_of_this_machine(cores, monkeypatch):
    cores(16)
    assert usable_cpus() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4
    assert usable_cpus() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert usable_cpus() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    assert usable_cpus() == 16


@pytest.mark.parametrize(
    ("n", "device", "augment_on", "workers"),
    [
        (16, CUDA, "cpu", 15),  # the workers augment for a GPU: every core but one
        (64, CUDA, "cpu", 63),
        (16, CUDA, "split", 15),  # they decode and crop for a GPU
        (16, CUDA, "gpu", 10),  # the workers only read bytes
        (16, CPU, "split", 10),
        (16, CPU, "cpu", 10),  # on a CPU device they take cores from the model
        (4, CPU, "cpu", 3),
        (2, CUDA, "cpu", 1),
        (1, CPU, "cpu", 1),  # at least one
    ],
)
def test_training_workers(cores, n, device, augment_on, workers):
    cores(n)
    assert training_workers(device, augment_on) == workers


def test_pretrain_loader_takes_the_default(cores, tmp_path):
    from dinocli.distributed import ProcessGroup
    from dinocli.train import resolve_config
    from dinocli.train.loop import Trainer

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        make_rgb_image(40, 36, seed=i).save(tmp_path / "imgs" / f"{i}.png")
    cfg = resolve_config(overrides={
        "data": str(tmp_path / "imgs"), "output": str(tmp_path / "run"), "arch": "vit_tiny",
        "patch_size": 8, "out_dim": 16, "global_crop_size": 32, "local_crop_size": 16,
        "local_crops_number": 1, "batch_size": 2, "epochs": 1, "warmup_epochs": 0, "precision": "fp32", "device": "cpu",
        "progress": False,
    })  # fmt: skip
    assert cfg.num_workers == -1
    cores(4)
    trainer = Trainer(cfg, ProcessGroup(), CPU, "fp32", display_rich=False)
    try:
        loader = trainer._loader()
        assert loader.num_workers == 3 == training_workers(CPU, cfg.augment_on)
    finally:
        trainer.close()


def test_timed_iterator_adds_up_the_waits_for_its_items():
    def slow(n: int, seconds: float):
        for i in range(n):
            time.sleep(seconds)
            yield i

    items = TimedIterator(slow(3, 0.05))
    assert next(items) == 0 and 0.05 <= items.take() < 0.3
    got = []
    for i in items:
        got.append(i)
        time.sleep(0.1)  # work between items is not waiting: 0.2 s not counted
    assert got == [1, 2] and 0.1 <= items.take() < 0.3
    assert items.take() == 0.0
