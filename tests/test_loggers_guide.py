"""docs/plugins.md works as written: its example plugin of each kind (backbone, augmentation, collapse
strategy, recipe, logger) is registered as a plugin module and used for real, together in one run."""

from __future__ import annotations

import csv
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinocli
from dinocli.errors import UsageError
from dinocli.registry import PluginInfo, get_registry
from dinocli.train import resolve_config
from dinocli.train.loop import pretrain
from test_loggers import images  # noqa: F401 - the fixture

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
KINDS = ("backbone", "augmentation", "collapse strategy", "recipe", "logger")


def guide_examples() -> dict[str, str]:
    """The guide's Python blocks that start with ``# guide example: KIND``, by kind."""
    blocks = re.findall(r"```python\n# guide example: ([a-z ]+)\n(.*?)```", GUIDE.read_text(), re.S)
    return dict(blocks)


@pytest.fixture()
def guide_plugin(fresh_registry):
    """Every example module of the guide, registered as one plugin of a fresh registry."""
    module = types.ModuleType("guide_plugin")
    for source in guide_examples().values():
        exec(compile(source, str(GUIDE), "exec"), module.__dict__)
    get_registry().add_plugin(module, PluginInfo("guide", "guide", "0", builtin=False))
    return module


def test_the_guide_has_an_example_per_kind():
    assert sorted(guide_examples()) == sorted(KINDS)


def test_guide_backbone_augmentation_and_strategy_keep_their_contracts(guide_plugin):
    assert get_registry().plugins["guide"].error is None
    model = dinocli.create_backbone("tiny_cnn", patch_size=8, img_size=32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == model(torch.randn(2, 3, 16, 16)).shape == (2, 64)

    aug = dinocli.create_augmentation("square_crops", global_crop_size=32, local_crop_size=16, local_crops_number=3)
    image = Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8))
    crops = aug(image, torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    again = aug(image, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    flat = (torch.tensor(128 / 255) - mean) / std  # a flat image's crops are flat
    assert torch.allclose(crops[0].mean(dim=(1, 2)), flat, atol=1e-5)

    strategy = dinocli.create_collapse_strategy("mean-centering", out_dim=5, n_global=2, n_crops=5)
    logits = torch.randn(6, 5)
    targets = strategy.targets(logits, 0.04)
    assert torch.allclose(targets.sum(-1), torch.ones(6)) and torch.equal(targets, torch.softmax(logits / 0.04, -1))
    strategy.update(logits)
    assert torch.allclose(strategy.center, 0.1 * logits.mean(0, keepdim=True))
    assert strategy.metrics() == {"center_norm": pytest.approx(float((0.1 * logits.mean(0)).norm()))}


def test_guide_recipe_sets_values_that_explicit_options_override(guide_plugin, images, tmp_path):
    common = {"recipe": "by-size", "data": str(images), "output": str(tmp_path / "run")}
    said: list[str] = []
    cfg = resolve_config(overrides=common, explain=said.append)
    assert (cfg.out_dim, cfg.epochs) == (2048, 50)
    assert "recipe by-size: out_dim = 2048  (prototypes for this data size)" in said
    assert resolve_config(overrides={**common, "out_dim": 512, "epochs": 30}).out_dim == 512
    with pytest.raises(UsageError, match="needs --data to be a folder"):
        resolve_config(overrides={**common, "data": str(tmp_path / "missing")})


def test_a_run_built_from_the_guide_examples_alone(guide_plugin, images, tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config(overrides={
        "data": str(images), "output": str(run), "epochs": 1, "warmup_epochs": 0, "arch": "tiny_cnn",
        "augmentation": "square_crops", "collapse": "mean-centering", "logger": "jsonl,csv",
        "out_dim": 16, "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2,
        "batch_size": 4, "num_workers": 0, "precision": "fp32", "progress": False, "log_every": 1,
    })
    pretrain(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["iteration"], r["loss"]) for r in records if "summary" not in r]
    assert len(losses) == 2 and all("center_norm" in r for r in records if "summary" not in r)
    with open(run / "metrics.csv", newline="") as f:
        rows = [(int(step), float(value)) for step, name, value in csv.reader(f) if name == "train/loss"]
    assert rows == [(step, pytest.approx(loss)) for step, loss in losses]


def test_the_guide_logger_test_passes(guide_plugin, tmp_path):
    (source,) = re.findall(r"```python\n(from dinocli.loggers import open_loggers\n.*?)```", GUIDE.read_text(), re.S)
    namespace: dict = {}
    exec(compile(source, str(GUIDE), "exec"), namespace)
    namespace["test_csv_logger"](tmp_path)
