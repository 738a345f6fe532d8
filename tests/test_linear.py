"""Linear evaluation: the batched lr sweep against runs of each lr alone, SGD against its formula, files, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dinocli.errors import UsageError
from dinocli.evaluate import Features, save_features
from dinocli.evaluate.linear import (
    accuracy,
    cached_batches,
    cosine_factor,
    epoch_order,
    initial_weights,
    linear_reference,
    load_classifier,
    save_classifier,
    train_linear,
)
from dinocli.evaluate.linear_sweep import DEFAULT_LRS, fit_grid, holdout_split, linear_sweep


def clustered(n: int, dim: int, classes: int, noise: float, seed: int) -> Features:
    """Features around one random center per class (the centers fixed by class count and dim)."""
    centers = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(1000 + classes + dim))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = centers[labels] + noise * torch.randn(n, dim, generator=g)
    return Features(feats, labels, [f"c{i}" for i in range(classes)], metadata={"n_last_blocks": 1})


def reference_run(x, y, classes, lr, wd, epochs, batch_size, seed):
    """The reference recipe as nn.Linear + torch.optim.SGD + CosineAnnealingLR (train_linear)."""
    clf, _ = train_linear(
        cached_batches(x, y, batch_size, seed), x.shape[1], classes, lr=lr, weight_decay=wd,
        epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    return clf


def test_lr_sweep_equals_running_each_lr_alone() -> None:
    feats = clustered(203, 12, 4, noise=2.0, seed=0)  # 203: the last batch of each epoch is short
    lrs, wds = [0.01, 0.3, 3.0], [0.0, 0.05]
    weights, biases, pairs = fit_grid(feats.features, feats.labels, 4, lrs, wds, epochs=4, batch_size=32, seed=7)
    assert pairs == [(lr, wd) for lr in lrs for wd in wds]
    assert weights.shape == (6, 4, 12) and biases.shape == (6, 4)
    for (lr, wd), w, b in zip(pairs, weights, biases):
        alone = reference_run(feats.features, feats.labels, 4, lr, wd, epochs=4, batch_size=32, seed=7)
        torch.testing.assert_close(w, alone.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, alone.bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weights[0], weights[2])  # the pairs really differ


def test_one_full_batch_epoch_is_one_sgd_step_of_the_cross_entropy_gradient() -> None:
    feats = clustered(40, 6, 3, noise=1.0, seed=1)
    x, y = feats.features.double(), feats.labels
    w0, b0 = initial_weights(6, 3, seed=0)
    w0, b0 = w0.double(), b0.double()
    logits = x @ w0.T + b0
    p = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    p[torch.arange(40), y] -= 1  # d(mean CE)/d(logits) * N
    lr = 0.5 * 40 / 256  # the linear scaling rule
    wd = 0.1
    expect_w = w0 - lr * (p.T @ x / 40 + wd * w0)
    expect_b = b0 - lr * (p.sum(0) / 40 + wd * b0)
    for w, b in (
        fit_grid(feats.features, y, 3, [0.5], [wd], epochs=1, batch_size=40, seed=0)[:2],
        (lambda c: (c.weight[None], c.bias[None]))(reference_run(feats.features, y, 3, 0.5, wd, 1, 40, 0)),
    ):
        torch.testing.assert_close(w[0].double(), expect_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[0].double(), expect_b, rtol=1e-5, atol=1e-6)


def test_recipe_pieces_match_the_reference() -> None:
    # CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0)
    for epoch in range(7):
        assert math.isclose(opt.param_groups[0]["lr"], 2.0 * cosine_factor(epoch, 7), rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()
    # DistributedSampler(shuffle=True, seed) on one process, after set_epoch(epoch)
    sampler = torch.utils.data.DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(5)
    assert epoch_order(50, 3, 5).tolist() == list(sampler)
    w, b = initial_weights(300, 100, seed=0)
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4 and not b.any()


def test_separable_set_reaches_100_percent() -> None:
    train, val = clustered(120, 8, 5, noise=0.3, seed=0), clustered(50, 8, 5, noise=0.3, seed=1)
    report = linear_sweep(train, val, lrs=[0.01, 0.1, 1.0], epochs=10, batch_size=32, device="cpu")
    assert report.top1 == 100.0 and report.top5 == 100.0
    assert len(report.sweep) == 3 and report.num_holdout == 10  # 2 of each class's 24
    assert report.lr in (0.01, 0.1, 1.0) and report.mode == "fast"
    assert accuracy(report.classifier.logits(val.features), val.labels) == (100.0, 100.0)
    ref = linear_reference(train, val, lr=1.0, epochs=10, batch_size=32, device="cpu")
    assert ref.top1 == 100.0 and len(ref.history) == 10 and ref.best_top1 == 100.0


def test_sweep_picks_the_best_held_out_pair_and_refits_on_all_of_train() -> None:
    train, val = clustered(300, 16, 6, noise=5.0, seed=0), clustered(120, 16, 6, noise=5.0, seed=1)
    lrs = [1e-5, 0.05, 1.0]
    report = linear_sweep(train, val, lrs=lrs, epochs=5, batch_size=64, device="cpu", seed=2)
    best = max(report.sweep, key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    assert report.lr == best["lr"] and report.lr != 1e-5  # lr 1e-5 barely moves from the init
    alone = reference_run(train.features, train.labels, 6, report.lr, 0.0, 5, 64, 2)
    torch.testing.assert_close(report.classifier.weight, alone.weight, rtol=1e-4, atol=1e-5)
    fit_idx, held_idx = holdout_split(train.labels, 0.1, 2)
    assert report.num_holdout == held_idx.numel() == 30
    no_refit = linear_sweep(train, val, lrs=lrs, epochs=5, batch_size=64, device="cpu", seed=2, refit=False)
    held_out = reference_run(train.features[fit_idx], train.labels[fit_idx], 6, no_refit.lr, 0.0, 5, 64, 2)
    torch.testing.assert_close(no_refit.classifier.weight, held_out.weight, rtol=1e-4, atol=1e-5)


def test_holdout_split_is_stratified_and_disjoint() -> None:
    labels = torch.tensor([0] * 20 + [1] * 9 + [2] * 2)
    fit, held = holdout_split(labels, 0.25, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(31))
    assert torch.bincount(labels[held], minlength=3).tolist() == [5, 2, 1]
    assert torch.bincount(labels[fit], minlength=3).tolist() == [15, 7, 1]


def test_bf16_sweep_is_close_to_fp32() -> None:
    train, val = clustered(200, 32, 4, noise=3.0, seed=0), clustered(100, 32, 4, noise=3.0, seed=1)
    args = dict(lrs=[0.1], holdout=0, epochs=5, batch_size=50, device="cpu")
    fp32 = linear_sweep(train, val, precision="fp32", **args)
    bf16 = linear_sweep(train, val, precision="bf16", **args)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    torch.testing.assert_close(bf16.classifier.weight, fp32.classifier.weight, rtol=0.05, atol=2e-3)
    assert abs(bf16.top1 - fp32.top1) <= 2.0


def test_accuracy_top5_and_ties() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert accuracy(logits, torch.tensor([1, 2])) == (0.0, None)  # a tie ranks the lower class first
    assert accuracy(logits, torch.tensor([0, 1])) == (100.0, None)
    many = torch.arange(6.0).repeat(4, 1)
    assert accuracy(many, torch.tensor([5, 1, 0, 3])) == (25.0, 75.0)  # ranks 0, 4, 5, 2


def test_classifier_file_round_trip(tmp_path: Path) -> None:
    train, val = clustered(60, 8, 3, noise=1.0, seed=0), clustered(30, 8, 3, noise=1.0, seed=1)
    report = linear_sweep(train, val, lrs=[0.1], holdout=0, epochs=3, batch_size=16, device="cpu")
    path = tmp_path / "clf.safetensors"
    save_classifier(path, report.classifier)
    loaded = load_classifier(path)
    assert loaded.classes == ["c0", "c1", "c2"] and loaded.metadata["lr"] == 0.1
    assert loaded.metadata["features"] == {"n_last_blocks": 1} and loaded.metadata["mode"] == "fast"
    torch.testing.assert_close(loaded.logits(val.features), report.classifier.logits(val.features))
    assert loaded.accuracy(val) == (report.top1, report.top5)
    save_features(tmp_path / "feats.safetensors", val)
    with pytest.raises(UsageError, match="not a dinocli linear classifier"):
        load_classifier(tmp_path / "feats.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UsageError, match="not a valid safetensors"):
        load_classifier(tmp_path / "junk.safetensors")
    with pytest.raises(UsageError, match="takes 8-dimensional features"):
        loaded.logits(torch.zeros(2, 9))


def _unlabelled(f: Features) -> Features:
    return Features(f.features, torch.full_like(f.labels, -1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, v: (_unlabelled(t), v), "train set is unlabelled"),
        (lambda t, v: (t, _unlabelled(v)), "val set is unlabelled"),
        (lambda t, v: (Features(t.features, torch.zeros_like(t.labels)), v), "at least 2"),
        (lambda t, v: (t, Features(v.features[:, :5], v.labels)), "8-dimensional but the val features are 5"),
        (lambda t, v: (Features(torch.zeros(0, 8), torch.zeros(0)), v), "train set is empty"),
        (lambda t, v: (Features(t.features * float("nan"), t.labels), v), "NaN or infinite"),
        (lambda t, v: (t, Features(v.features, v.labels, ["x", "y", "z"])), "different classes"),
    ],
)
def test_api_errors(change, message: str) -> None:
    train, val = change(clustered(30, 8, 3, 1.0, 0), clustered(12, 8, 3, 1.0, 1))
    with pytest.raises(UsageError, match=message):
        linear_sweep(train, val, lrs=[0.1], epochs=1, device="cpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lrs": [0.0]}, "learning rates must be positive"),
        ({"weight_decays": [-1.0]}, "weight decays must be 0 or more"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 0}, "--linear-batch-size. must be positive"),
        ({"holdout": 1.5}, "held-out fraction"),
        ({"holdout": 0}, "need a held-out part"),
        ({"precision": "fp16"}, "fp32 or bf16"),
    ],
)
def test_option_errors(options: dict, message: str) -> None:
    train, val = clustered(30, 8, 3, 1.0, 0), clustered(12, 8, 3, 1.0, 1)
    with pytest.raises(UsageError, match=message):
        linear_sweep(train, val, **{"lrs": DEFAULT_LRS[:2], "epochs": 1, "device": "cpu", **options})
