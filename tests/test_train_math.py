"""The training pieces against independent formulas: loss, centering, schedules, EMA, head, clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocli.heads import DINOHead
from dinocli.strategies.centering import Centering
from dinocli.train.loss import multicrop_cross_entropy
from dinocli.train.model import MultiCropNetwork, ema_update
from dinocli.train.optim import LARS, clip_gradients, param_groups
from dinocli.train.sampler import EpochSampler
from dinocli.train.schedules import CosineSchedule, TeacherTempSchedule, build_schedules


def reference_dino_loss(student, teacher, center, n_crops, teacher_temp, student_temp=0.1):
    """The paper's Eq. 3 written as the reference's loop over view pairs."""
    s = (student / student_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("n_crops", [2, 4, 10])
def test_loss_matches_reference_formula(n_crops):
    g = torch.Generator().manual_seed(n_crops)
    B, K = 5, 17
    student = torch.randn(n_crops * B, K, generator=g) * 3
    teacher = torch.randn(2 * B, K, generator=g) * 3
    center = torch.randn(1, K, generator=g)
    strategy = Centering(K)
    strategy.center.copy_(center)
    ours = multicrop_cross_entropy(student, strategy.targets(teacher, 0.04), n_crops)
    expected = reference_dino_loss(student, teacher, center, n_crops, 0.04)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_loss_is_log_k_for_uniform_outputs():
    K = 64
    loss = multicrop_cross_entropy(torch.zeros(4 * 3, K), torch.full((2 * 3, K), 1 / K), 4)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


def test_center_is_ema_of_batch_mean():
    K = 8
    strategy = Centering(K, center_momentum=0.9)
    t1, t2 = torch.randn(6, K), torch.randn(6, K)
    strategy.update(t1)
    strategy.update(t2)
    expected = 0.9 * (0.1 * t1.mean(0)) + 0.1 * t2.mean(0)
    torch.testing.assert_close(strategy.center[0], expected)
    assert strategy.metrics()["center_norm"] == pytest.approx(expected.norm().item(), rel=1e-6)


def reference_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_cosine_schedule_matches_reference_array(warmup_epochs):
    epochs, niter = 7, 5
    expected = reference_cosine(0.002, 1e-6, epochs, niter, warmup_epochs)
    ours = CosineSchedule(0.002, 1e-6, epochs * niter, warmup_epochs * niter)
    for it in [0, 1, 4, 5, 9, 14, 15, 20, 34]:
        assert ours(it) == pytest.approx(expected[it], rel=1e-12, abs=1e-15)


def test_teacher_temperature_schedule_matches_reference():
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100 - 30) * 0.07))
    ours = TeacherTempSchedule(0.04, 0.07, 30)
    for epoch in [0, 1, 15, 29, 30, 99]:
        assert ours(epoch) == pytest.approx(expected[epoch])
    assert TeacherTempSchedule(0.04, 0.04, 0)(0) == 0.04


def test_schedules_scale_lr_with_global_batch_and_raise_momentum_to_one():
    s = build_schedules(
        lr=0.0005, min_lr=1e-6, global_batch=1024, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.04,
        warmup_teacher_temp_epochs=0, epochs=10, warmup_epochs=2, iters_per_epoch=10,
    )
    assert s.lr(0) == 0.0
    assert s.lr(19) == pytest.approx(0.0005 * 4)  # end of warm-up: peak lr, scaled by 1024/256
    assert s.lr(99) == pytest.approx(1e-6, abs=1e-6)
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.momentum(0) == pytest.approx(0.996)
    assert s.momentum(99) == pytest.approx(1.0, abs=1e-5)


def test_ema_update_formula():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_head_has_reference_keys_and_unit_prototype_norm():
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    assert set(head.state_dict()) == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
    }
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    x = torch.randn(3, 32)
    z = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)
    bn = DINOHead(32, 10, use_bn=True, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert "mlp.1.running_mean" in bn.state_dict() and "mlp.6.weight" in bn.state_dict()
    assert bn.last_layer.weight_g.requires_grad


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    net = MultiCropNetwork(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)),
                           DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4))
    decayed, plain = param_groups(net)
    assert plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim == 1 for p in plain["params"])
    frozen = net.head.last_layer.weight_g
    assert all(p is not frozen for p in decayed["params"] + plain["params"])


def test_per_tensor_clipping_matches_reference():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    clip_gradients([a, b], 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) / (5.0 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.0]))  # under the threshold: unchanged


def test_lars_step_matches_formula():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    p.grad = torch.tensor([[1.0, 0.0]])
    opt = LARS([p], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    dp = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])
    q = 0.001 * 5.0 / dp.norm()
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * q * dp)


def test_sampler_shards_global_batches_across_processes():
    single = list(EpochSampler(20, 8, seed=3))
    ranks = [list(EpochSampler(20, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 16  # drop_last: 2 global batches of 8
    for b in range(2):
        merged = ranks[0][b * 4:(b + 1) * 4] + ranks[1][b * 4:(b + 1) * 4]
        assert merged == single[b * 8:(b + 1) * 8]
    s = EpochSampler(20, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != single
    s.set_epoch(0, skip_batches=1)
    assert list(s) == single[8:]
