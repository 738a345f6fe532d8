"""The fast training step against plain references over 20 iterations, on the CPU: the fused AdamW
against torch's single-tensor AdamW, the foreach EMA against its formula, and 20 iterations of
pretraining with the augmentation on the device against the CPU path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinocli.train.model import ema_update
from dinocli.train.optim import build_optimizer, param_groups

from conftest import HostWaits, make_rgb_image


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


def test_fused_adamw_equals_single_tensor_adamw_over_20_iterations():
    fast, plain = small_net(0), small_net(0)
    opt_fast = build_optimizer("adamw", param_groups(fast))
    opt_plain = torch.optim.AdamW(param_groups(plain), lr=0.0, foreach=False, fused=False)
    g = torch.Generator().manual_seed(1)
    for it in range(20):
        x = torch.randn(8, 12, generator=g)
        for opt in (opt_fast, opt_plain):
            for i, group in enumerate(opt.param_groups):  # per-iteration schedules, as the loop sets them
                group["lr"] = 1e-2 * (1 + it) / 20
                if i == 0:
                    group["weight_decay"] = 0.04 + 0.01 * it
        for net, opt in ((fast, opt_fast), (plain, opt_plain)):
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(fast.parameters()), next(small_net(0).parameters()))  # it did move


def test_foreach_ema_equals_its_formula_over_20_iterations():
    teacher, student = small_net(0), small_net(1)
    expected = [p.detach().double().clone() for p in teacher.parameters()]
    g = torch.Generator().manual_seed(2)
    for it in range(20):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        m = 0.996 + 0.004 * it / 20
        ema_update(teacher, student, m)
        expected = [m * e + (1 - m) * s.detach().double() for e, s in zip(expected, student.parameters())]
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_20_iterations_with_the_augmentation_on_the_device_match_the_cpu_path(tmp_path):
    """Equal within bf16 tolerance: the views differ by the resize's rounding only (``gpu``), or
    not at all (``split``: colour on the device, the same arithmetic)."""
    from dinocli.train import resolve_config
    from dinocli.train.loop import pretrain

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(8):
        make_rgb_image(48 + 4 * i, 40, seed=i).save(root / f"{i}.jpg", quality=92)
    losses = {}
    for where in ("cpu", "split", "gpu"):
        cfg = resolve_config(overrides={
            "data": str(root), "output": str(tmp_path / where), "arch": "vit_tiny", "patch_size": 8,
            "out_dim": 32, "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2,
            "batch_size": 2, "epochs": 5, "warmup_epochs": 1, "num_workers": 0, "precision": "fp32",
            "device": "cpu", "progress": False, "augment_on": where, "lr": 0.005,
        })  # fmt: skip
        losses[where] = [r["loss"] for r in pretrain(cfg).history]
    assert len(losses["cpu"]) == 5  # 5 epochs of 4 iterations
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=4e-3)  # 2^-8: bf16's rounding
    assert losses["split"] == losses["cpu"]  # the same views: only where the colour runs differs


def _trainer(tmp_path, name: str, **options):
    from dinocli.distributed import ProcessGroup
    from dinocli.train import resolve_config
    from dinocli.train.loop import Trainer

    root = tmp_path / "imgs"
    if not root.exists():
        root.mkdir()
        for i in range(4):
            make_rgb_image(40, 36, seed=i).save(root / f"{i}.png")
    cfg = resolve_config(overrides={
        "data": str(root), "output": str(tmp_path / name), "arch": "vit_tiny", "patch_size": 8,
        "out_dim": 64, "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2,
        "batch_size": 4, "epochs": 2, "warmup_epochs": 1, "num_workers": 0, "precision": "fp32",
        "device": "cpu", "progress": False, **options,
    })  # fmt: skip
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), cfg.precision, display_rich=False)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-3
    return trainer


def _views(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)
    ]


def _losses(trainer, iterations: int, diagnose: bool) -> list[float]:
    losses: list[float] = []
    try:
        for it in range(iterations):
            losses += trainer.step(_views(it), 0.04, 0.996, diagnose=diagnose)[0]
        return losses + trainer.settle()
    finally:
        trainer.close()


def test_a_step_leaves_its_loss_on_the_device_until_the_next_one(tmp_path):
    trainer = _trainer(tmp_path, "lazy")
    try:
        assert trainer.step(_views(0), 0.04, 0.996, diagnose=False) == ([], {})  # nothing read yet
        first, _ = trainer.step(_views(1), 0.04, 0.996, diagnose=False)  # the first step's loss
        second = trainer.settle()
        assert len(first) == len(second) == 1 and trainer.settle() == []
    finally:
        trainer.close()
    # the same trajectory as reading every loss at once (diagnose=True reads them all)
    eager = _losses(_trainer(tmp_path, "read-each"), 2, diagnose=True)
    assert first + second == eager


@pytest.mark.parametrize(
    "options",
    [{}, {"collapse": "sinkhorn-knopp"}, {"collapse": "centering,koleo"}, {"optimizer": "sgd"},
     {"optimizer": "lars"}, {"clip_grad_mode": "global"}, {"precision": "bf16"}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)  # fmt: skip
def test_a_step_never_makes_the_host_wait_for_the_device(tmp_path, options):
    """No value read back, no data-dependent size, no tensor from a host value inside a step
    (``diagnose=False``: the iterations that are not logged); :class:`HostWaits` sees them."""
    trainer = _trainer(tmp_path, "host-waits", **options)
    try:
        trainer.step(_views(0), 0.04, 0.996, diagnose=False)
        with HostWaits() as waits:
            trainer.step(_views(1), 0.04, 0.996, diagnose=False)
        assert waits.ops == []
    finally:
        trainer.close()


def test_host_waits_sees_each_kind_of_wait():
    t = torch.randn(4, requires_grad=True)
    with HostWaits() as waits:
        float(t.detach().sum())
        t.detach().nonzero()
        t[t > 0].sum().backward()
        torch.tensor(2.0)
        t.detach()[torch.arange(2)] * 2  # an integer index made on the device does not wait
    assert waits.ops == [
        "aten::_local_scalar_dense", "aten::nonzero", "aten::index with a boolean mask",
        "aten::index_put with a boolean mask", "aten::lift_fresh",
    ]  # fmt: skip


@pytest.mark.slow
def test_20_compiled_iterations_match_the_eager_ones(tmp_path):
    """``--compile`` (inductor on the CPU) against eager over 20 iterations, without stochastic
    depth (compiled code draws its masks from its own generator)."""
    eager = _losses(_trainer(tmp_path, "eager", drop_path_rate=0.0), 20, diagnose=False)
    compiled = _losses(_trainer(tmp_path, "compiled", drop_path_rate=0.0, compile=True), 20, diagnose=False)
    assert len(eager) == 20 and len(set(eager)) > 1  # it trained
    assert compiled == pytest.approx(eager, rel=4e-3)  # 2^-8: bf16's rounding; fp32 here is closer


def test_a_step_on_uint8_levels_equals_the_step_on_the_float_views(tmp_path):
    """What a GPU run's workers send (:class:`LevelBatch`) trains exactly as the float views."""
    from dinocli.augmentations.gpu import normalize
    from dinocli.data.multicrop_dataset import LevelBatch, LevelViews

    g = torch.Generator().manual_seed(0)
    sizes = (32, 32, 16, 16)
    items = [
        LevelViews([torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8) for s in sizes],
                   (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        for _ in range(4)
    ]  # fmt: skip
    floats = [normalize(torch.stack(v), items[0].mean, items[0].std) for v in zip(*(i.views for i in items))]
    losses = []
    for views in (LevelBatch(items), floats):
        trainer = _trainer(tmp_path, f"levels-{len(losses)}")
        try:
            losses.append(trainer.step(views, 0.04, 0.996, diagnose=True)[0])
        finally:
            trainer.close()
    assert losses[0] == losses[1] and len(losses[0]) == 1
