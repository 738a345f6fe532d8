"""Tests of the example plugin: discovery through its entry point, and each component's behaviour.

Run from this folder or from the dinocli repository root (``pytest``); the plugin must be
installed (``pip install -e plugins/dino-example``).
"""

from __future__ import annotations

import math
import random
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "dino_example", reason="the example plugin is not installed: pip install -e plugins/dino-example"
)

import dinocli  # noqa: E402
from dinocli.registry import get_registry, reset_registry  # noqa: E402
from dino_example.augmentation import ExampleSimple, random_crop_box  # noqa: E402
from dino_example.backbone import ExampleCNN  # noqa: E402
from dino_example.strategy import MeMax  # noqa: E402

AUG_KWARGS = dict(
    global_crops_scale=(0.4, 1.0),
    local_crops_scale=(0.05, 0.4),
    local_crops_number=3,
    global_crop_size=32,
    local_crop_size=16,
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.25, 0.3),
)


def noise_image(width: int = 50, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv("DINOCLI_PLUGINS", raising=False)
    reset_registry()
    yield get_registry()
    reset_registry()


def test_discovered_through_its_entry_point(registry):
    info = registry.plugins["example"]
    assert info.distribution == "dino-example"
    assert info.version == metadata.version("dino-example") == "0.1.0"
    assert info.error is None and not info.builtin
    assert registry.get("backbones", "example_cnn").plugin == "example"
    assert registry.get("augmentations", "example_simple").plugin == "example"
    assert registry.get("collapse_strategies", "me-max").plugin == "example"
    (ep,) = [e for e in metadata.entry_points(group="dinocli") if e.name == "example"]
    assert ep.value == "dino_example" and ep.dist.name == "dino-example"


def test_backbone_through_dinocli(registry):
    model = dinocli.create_backbone(
        "example_cnn", patch_size=16, img_size=32, drop_path_rate=0.1, embed_dim=24
    )
    assert isinstance(model, dinocli.Backbone) and isinstance(model, ExampleCNN)
    assert (model.embed_dim, model.patch_size, model.supports_attention) == (24, None, False)
    x = torch.randn(3, 3, 37, 29)
    out = model(x)
    assert out.shape == (3, 24)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 100_000  # small by design


def test_augmentation_crops_are_normalised_views_of_the_image():
    aug = ExampleSimple(**AUG_KWARGS)
    colour = (200, 40, 90)
    crops = aug(Image.new("RGB", (60, 45), colour), torch.Generator().manual_seed(0))
    assert (aug.n_global, aug.n_local) == (2, 3) and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    # a flat image stays flat: every pixel is (value / 255 - mean) / std
    mean, std = AUG_KWARGS["mean"], AUG_KWARGS["std"]
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(colour, mean, std)])
    for crop in crops:
        torch.testing.assert_close(crop, expected[:, None, None].expand_as(crop), rtol=0, atol=1e-5)


def test_augmentation_uses_only_the_generator(registry):
    aug = dinocli.create_augmentation("example_simple", **AUG_KWARGS, some_future_option=1)
    image = noise_image()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = aug(image, torch.Generator().manual_seed(7))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    again = aug(image, torch.Generator().manual_seed(7))
    other = aug(image, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_flip_and_crop_scale():
    # left half black, right half white, whole-image crops: each view is the image or its mirror
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, 16:] = 255
    whole = {"global_crops_scale": (1.0, 1.0), "mean": (0, 0, 0), "std": (1, 1, 1)}
    aug = ExampleSimple(**{**AUG_KWARGS, **whole})
    left_means = {
        round(float(aug(Image.fromarray(array), torch.Generator().manual_seed(s))[0][:, :, :16].mean()), 2)
        for s in range(12)
    }
    assert left_means == {0.0, 1.0}
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(100, 80, (0.05, 0.4), g)
        assert 0 <= top <= 80 - h and 0 <= left <= 100 - w
        assert 0.05 * 8000 * 0.9 <= h * w <= 0.4 * 8000 * 1.1  # rounding aside, the area fraction


def test_bad_options_are_usage_errors(registry):
    scale_error = r"global_crops_scale must be two numbers .* \(0\.8, 0\.4\)"
    with pytest.raises(dinocli.UsageError, match=scale_error):
        dinocli.create_augmentation("example_simple", global_crops_scale=(0.8, 0.4))
    with pytest.raises(dinocli.UsageError, match="embed_dim and width must be positive, got 0 and 32"):
        dinocli.create_backbone("example_cnn", embed_dim=0)
    with pytest.raises(dinocli.UsageError, match="me-max needs out_dim >= 2 and student_temp > 0"):
        dinocli.create_collapse_strategy("me-max", out_dim=1)


def independent_me_max(logits: np.ndarray, temp: float) -> float:
    z = logits / temp
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mean = p.mean(axis=0)
    return math.log(logits.shape[1]) + float(np.sum(mean * np.log(mean)))


def test_me_max_matches_the_formula(registry):
    strategy = dinocli.create_collapse_strategy("me-max", out_dim=10, student_temp=0.1, n_global=2, n_crops=4)
    assert isinstance(strategy, dinocli.CollapseStrategy) and strategy.provides_targets is False
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = strategy.regularizer(torch.randn(6, 8), logits)
    assert value.ndim == 0
    assert value.item() == pytest.approx(independent_me_max(logits.numpy(), 0.1), rel=1e-6)
    assert strategy.metrics()["mean_entropy"] == pytest.approx(math.log(10) - value.item(), rel=1e-6)
    with pytest.raises(TypeError, match="does not provide teacher targets"):
        strategy.targets(logits, 0.04)


def test_me_max_is_zero_when_balanced_and_large_when_collapsed():
    strategy = MeMax(out_dim=4, student_temp=0.1)
    balanced = 10 * torch.eye(4)  # each row picks another prototype: the mean is uniform
    assert strategy.regularizer(torch.zeros(4, 2), balanced).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[10.0, 0, 0, 0]] * 4)
    assert strategy.regularizer(torch.zeros(4, 2), collapsed).item() > 0.9 * math.log(4)


def test_me_max_gradient_spreads_the_outputs():
    strategy = MeMax(out_dim=6, student_temp=0.5, weight=2.0)
    logits = torch.zeros(8, 6)
    logits[:, 0] = 3.0
    logits.requires_grad_(True)
    before = strategy.regularizer(torch.zeros(8, 4), logits)
    before.backward()
    assert logits.grad[:, 0].max() > 0 and logits.grad[:, 1:].max() < 0  # descent lowers the dominant logit
    with torch.no_grad():
        after = strategy.regularizer(torch.zeros(8, 4), logits - 0.5 * logits.grad)
    assert after < before
    with pytest.raises(ValueError, match="expects 6 logits per row, got 5"):
        strategy.regularizer(torch.zeros(2, 4), torch.zeros(2, 5))
