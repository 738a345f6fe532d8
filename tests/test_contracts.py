"""Contract tests: every registered backbone, augmentation and collapse strategy, plugins included.

The parameters are read from the live registry when the tests are collected, so an installed
plugin is tested by simply running ``pytest tests/test_contracts.py`` (``-k <name>`` for one).
"""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import dinocli
from dinocli.registry import get_registry
from dinocli.weights import torch_load

from conftest import HostWaits, make_rgb_image

SKIP_BACKBONES = {"resnet101", "resnet152"}  # larger than resnet50: slow, and nothing new to learn

BACKBONE_KWARGS = dict(patch_size=8, img_size=32, drop_path_rate=0.1, patch_embed="linear")
GLOBAL, LOCAL = 32, 16
AUG_KWARGS = dict(
    global_crops_scale=(0.4, 1.0),
    local_crops_scale=(0.05, 0.4),
    local_crops_number=3,
    global_crop_size=GLOBAL,
    local_crop_size=LOCAL,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
OUT_DIM, N_GLOBAL, N_CROPS, BATCH = 16, 2, 5, 3
STRATEGY_KWARGS = dict(out_dim=OUT_DIM, n_global=N_GLOBAL, n_crops=N_CROPS, student_temp=0.1)

_REGISTRY = get_registry()
BACKBONES = [n for n in _REGISTRY.names("backbones") if n not in SKIP_BACKBONES]
AUGMENTATIONS = _REGISTRY.names("augmentations")
STRATEGIES = _REGISTRY.names("collapse_strategies")


def batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- backbones ------------------------------------------------------------------------------------


SLOW_BACKBONES = {"vit_base", "resnet50"}


@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BACKBONES else n for n in BACKBONES],
)
def built_backbone(request):
    """One model per backbone, shared by its tests (pytest groups them by backbone)."""
    torch.manual_seed(0)
    return request.param, dinocli.create_backbone(request.param, **BACKBONE_KWARGS)


@pytest.fixture
def backbone(built_backbone):
    """``(name, model)`` with gradients cleared; each test sets the mode it needs."""
    built_backbone[1].zero_grad(set_to_none=True)
    return built_backbone


def test_backbone_declares_its_interface(backbone):
    _, model = backbone
    assert isinstance(model, nn.Module) and isinstance(model, dinocli.Backbone)
    assert isinstance(model.embed_dim, int) and model.embed_dim > 0
    assert model.patch_size is None or (isinstance(model.patch_size, int) and model.patch_size > 0)
    assert isinstance(model.supports_attention, bool)
    if model.supports_attention:
        assert callable(getattr(model, "get_last_selfattention", None))


def test_backbone_forward_on_global_and_local_crops(backbone):
    _, model = backbone
    model.eval()
    with torch.no_grad():
        for size in (GLOBAL, LOCAL):
            x = batch(size)
            out = model(x)
            assert out.shape == (2, model.embed_dim) and out.dtype == torch.float32
            assert torch.isfinite(out).all()
            # in eval mode a sample's embedding does not depend on the rest of the batch
            scale = out.abs().max().item()
            torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-5 * scale)


def test_backbone_trains(backbone):
    _, model = backbone
    model.train()
    loss = model(batch(GLOBAL)).square().mean() + model(batch(LOCAL, seed=1)).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient (breaks DistributedDataParallel): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_backbone_attention_shape(backbone):
    _, model = backbone
    if not model.supports_attention:
        pytest.skip("this backbone does not return attention")
    model.eval()
    with torch.no_grad():
        attn = model.get_last_selfattention(batch(GLOBAL))
    tokens = 1 + (GLOBAL // model.patch_size) ** 2
    assert attn.ndim == 4 and attn.shape[0] == 2 and attn.shape[2:] == (tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:3]), rtol=0, atol=1e-5)


def test_backbone_rebuilds_from_its_kwargs(backbone):
    """A checkpoint stores the name and kwargs; the factory must rebuild the same architecture."""
    name, model = backbone
    rebuilt = dinocli.create_backbone(name, **BACKBONE_KWARGS)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch(GLOBAL)), model(batch(GLOBAL)), rtol=0, atol=0)


# -- augmentations --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("size", [(48, 40), (20, 12)], ids=["48x40", "20x12-smaller-than-crops"])
def test_augmentation_returns_global_then_local_crops(name, size):
    aug = dinocli.create_augmentation(name, **AUG_KWARGS)
    assert isinstance(aug, dinocli.Augmentation)
    assert aug.n_global >= 1 and aug.n_local == AUG_KWARGS["local_crops_number"]
    crops = aug(make_rgb_image(*size), torch.Generator().manual_seed(0))
    assert isinstance(crops, list) and len(crops) == aug.n_global + aug.n_local
    shapes = [tuple(c.shape) for c in crops]
    assert shapes == [(3, GLOBAL, GLOBAL)] * aug.n_global + [(3, LOCAL, LOCAL)] * aug.n_local
    for crop in crops:
        assert isinstance(crop, torch.Tensor) and crop.dtype.is_floating_point
        assert torch.isfinite(crop).all()
        assert crop.std() > 0  # a view of the image, not a constant


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_is_deterministic_given_the_generator(name):
    aug = dinocli.create_augmentation(name, **AUG_KWARGS)
    image = make_rgb_image(48, 40, seed=3)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = aug(image, torch.Generator().manual_seed(5))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)  # global random state must not matter
    again = aug(image, torch.Generator().manual_seed(5))
    other = aug(image, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # data-loading workers get a pickled copy: it must give the same crops
    copy = pickle.loads(pickle.dumps(aug))
    from_copy = copy(image, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, from_copy, strict=True))


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_without_local_crops(name):
    aug = dinocli.create_augmentation(name, **{**AUG_KWARGS, "local_crops_number": 0})
    crops = aug(make_rgb_image(), torch.Generator().manual_seed(0))
    assert aug.n_local == 0 and len(crops) == aug.n_global
    assert all(tuple(c.shape) == (3, GLOBAL, GLOBAL) for c in crops)


# -- collapse strategies --------------------------------------------------------------------------


def logits(rows: int, seed: int) -> torch.Tensor:
    return 3 * torch.randn(rows, OUT_DIM, generator=torch.Generator().manual_seed(seed))


def embeddings(seed: int = 9) -> torch.Tensor:
    return torch.randn(N_GLOBAL * BATCH, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_targets_and_regularizer(name):
    strategy = dinocli.create_collapse_strategy(name, **STRATEGY_KWARGS)
    assert isinstance(strategy, dinocli.CollapseStrategy)
    assert isinstance(strategy.provides_targets, bool)
    teacher = logits(N_GLOBAL * BATCH, seed=1)
    if strategy.provides_targets:
        targets = strategy.targets(teacher, 0.04)
        assert targets.shape == (N_GLOBAL * BATCH, OUT_DIM)
        assert torch.isfinite(targets).all() and (targets >= 0).all()
        torch.testing.assert_close(targets.sum(-1), torch.ones(N_GLOBAL * BATCH))
    student = logits(N_CROPS * BATCH, seed=2).requires_grad_(True)
    reg = strategy.regularizer(embeddings(), student)
    assert reg is None or (isinstance(reg, torch.Tensor) and reg.ndim == 0 and torch.isfinite(reg))
    if reg is not None and reg.requires_grad:
        reg.backward()
        assert student.grad is not None and torch.isfinite(student.grad).all()
    strategy.update(teacher)
    metrics = strategy.metrics()
    assert isinstance(metrics, dict)
    assert all(isinstance(k, str) and math.isfinite(float(v)) for k, v in metrics.items())


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_reads_device_values_only_in_metrics(name):
    """targets, regularizer (and its backward) and update run every step: a value read there
    (``float``, ``.item()``, a boolean index) makes the host wait for the GPU each time."""
    strategy = dinocli.create_collapse_strategy(name, **STRATEGY_KWARGS)
    teacher, student = logits(N_GLOBAL * BATCH, seed=1), logits(N_CROPS * BATCH, seed=2).requires_grad_(True)
    with HostWaits() as waits:
        if strategy.provides_targets:
            strategy.targets(teacher, 0.04)
        reg = strategy.regularizer(embeddings(), student)
        if reg is not None and reg.requires_grad:
            reg.backward()
        strategy.update(teacher)
    assert waits.ops == [], f"{name} waits for the device outside metrics(): {waits.ops}"


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_state_survives_a_checkpoint(name, tmp_path):
    trained = dinocli.create_collapse_strategy(name, **STRATEGY_KWARGS)
    for step in range(3):
        trained.update(logits(N_GLOBAL * BATCH, seed=10 + step))
    path = tmp_path / "strategy.pth"
    torch.save({"strategy": trained.state_dict()}, path)
    restored = dinocli.create_collapse_strategy(name, **STRATEGY_KWARGS)
    restored.load_state_dict(torch_load(path)["strategy"], strict=True)  # weights_only loading

    for key, value in trained.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    teacher, student = logits(N_GLOBAL * BATCH, seed=20), logits(N_CROPS * BATCH, seed=21)
    if trained.provides_targets:
        expected = trained.targets(teacher, 0.04)
        torch.testing.assert_close(restored.targets(teacher, 0.04), expected, rtol=0, atol=0)
    reg_a, reg_b = trained.regularizer(embeddings(), student), restored.regularizer(embeddings(), student)
    assert (reg_a is None) == (reg_b is None)
    if reg_a is not None:
        torch.testing.assert_close(reg_b, reg_a, rtol=0, atol=0)
