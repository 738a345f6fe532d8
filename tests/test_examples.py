"""Every example config is a complete, valid configuration; the API example is importable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dinocli.train import resolve_config
from dinocli.train.config import load_toml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_config_loads(path):
    values = load_toml(path)
    assert values, f"{path.name} sets nothing"
    cfg = resolve_config(path, {"data": "images", "output": "run"})
    for key, value in values.items():
        assert getattr(cfg, key) == value


def test_paper_recipes_have_their_distinctive_settings():
    boosted = load_toml(EXAMPLES / "vit_small_300ep.toml")
    assert (boosted["teacher_temp"], boosted["warmup_teacher_temp_epochs"], boosted["epochs"]) == (0.07, 30, 300)
    assert load_toml(EXAMPLES / "vit_base_16.toml")["arch"] == "vit_base"
    small = resolve_config(EXAMPLES / "small_images_32px.toml", {"data": "images", "output": "run"})
    assert (small.arch, small.patch_size, small.global_crop_size, small.epochs) == ("vit_tiny", 4, 32, 30)


def test_api_example_imports():
    spec = importlib.util.spec_from_file_location("train_api", EXAMPLES / "train_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
