"""Shared, generic test fixtures: a fresh plugin registry, CLI runners and small generated images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from dinocli.registry import reset_registry

# One compute thread per process: tests start several processes (torchrun, CLI subprocesses) on
# small CI machines, where OpenMP threads spinning against each other make tiny models many times
# slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class HostWaits(TorchDispatchMode):
    """Records the operations that, on a GPU, make the host wait for the device: reading a value
    (``float(t)``, ``.item()``, ``if t:``), a data-dependent size (``nonzero``, ``masked_select``,
    a boolean index ``t[mask]`` and its backward) or a tensor made from a host value
    (``torch.tensor(x, device=...)`` is a blocking copy). On the CPU they wait for nothing, so a
    CPU test sees them only this way. ``ops``: their names, in order."""

    _ALWAYS = {"aten::lift_fresh", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}
    _WITH_A_MASK = {"aten::index", "aten::index_put", "aten::index_put_"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = name in self._WITH_A_MASK and any(
            getattr(i, "dtype", None) in (torch.bool, torch.uint8) for i in args[1] if i is not None
        )
        if name in self._ALWAYS or masks:
            self.ops.append(name + (" with a boolean mask" if masks else ""))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Forget the process-wide registry before and after the test (entry points are reloaded)."""
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def cli() -> CliRunner:
    """A Typer ``CliRunner``; invoke with ``cli.invoke(app, [...])`` (``from dinocli.cli import app``)."""
    return CliRunner()


def _dino_command() -> list[str]:
    script = Path(sys.executable).with_name("dino")
    if script.exists():
        return [str(script)]
    found = shutil.which("dino")
    return [found] if found else [sys.executable, "-m", "dinocli"]


@pytest.fixture
def run_dino() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed ``dino`` console script in a subprocess: ``run_dino("plugins", env={...})``."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
        full_env = {**os.environ, **(env or {})}
        full_env.pop("DINOCLI_DEBUG", None)
        return subprocess.run(
            [*_dino_command(), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )

    return run


def make_rgb_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A small RGB image of smooth gradients plus seeded noise (not blank, not uniform)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture
def rgb_image() -> Image.Image:
    """One 48x40 RGB image (see :func:`make_rgb_image`)."""
    return make_rgb_image()


@pytest.fixture
def image_folder_tree(tmp_path: Path) -> Path:
    """An ImageFolder tree ``root/{train,val}/{class_a,class_b}/*.png``, 3 + 2 images per class."""
    root = tmp_path / "images"
    seed = 0
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("class_a", "class_b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                make_rgb_image(48, 40, seed).save(folder / f"img_{i}.png")
                seed += 1
    return root
