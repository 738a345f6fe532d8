"""Collapse strategies: Sinkhorn-Knopp, KoLeo, none, combinations, and that they prevent collapse."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dinocli.errors import UsageError
from dinocli.registry import list_collapse_strategies
from dinocli.strategies.combine import CombinedStrategy, build_collapse_strategy
from dinocli.strategies.koleo import koleo_loss
from dinocli.strategies.sinkhorn import sinkhorn_knopp
from dinocli.train import resolve_config
from dinocli.train.diagnostics import batch_diagnostics
from dinocli.train.loop import pretrain
from dinocli.train.loss import multicrop_cross_entropy

KW = dict(out_dim=12, n_global=2, n_crops=4, student_temp=0.1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: far faster than two contending threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_strategies_are_registered_plugins():
    assert {"centering", "sinkhorn-knopp", "koleo", "none"} <= set(list_collapse_strategies())


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------


def reference_sinkhorn(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """Alternating normalisation of exp(t / temp) to marginals B/K per prototype, 1 per sample."""
    q = np.exp(logits.astype(np.float64) / temp)  # [B, K]
    b, k = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=0, keepdims=True) * k  # each prototype: total 1/K
        q /= q.sum(axis=1, keepdims=True) * b  # each sample: total 1/B
    return q * b


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    logits = torch.randn(48, 12, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    assert q.shape == (48, 12) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(48), atol=1e-5, rtol=0)
    np.testing.assert_allclose(q.numpy(), reference_sinkhorn(logits.numpy(), 0.1, 3), rtol=1e-4, atol=1e-6)
    # Each prototype's column sums to B / K = 4: nearly after 3 iterations at a mild temperature
    # (far closer than the softmax's), and to any precision once the iterations converge.
    mild, softmax = sinkhorn_knopp(logits, 1.0), torch.softmax(logits, dim=1)
    assert (mild.sum(dim=0) - 4).abs().max() < 0.05 < 1.0 < (softmax.sum(dim=0) - 4).abs().max()
    converged = sinkhorn_knopp(logits, 0.5, n_iterations=50)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((12,), 4.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(48), atol=1e-5, rtol=0)


def test_sinkhorn_strategy_is_shift_invariant_and_never_overflows():
    strategy = build_collapse_strategy("sinkhorn-knopp", **KW)
    logits = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    q = strategy.targets(logits, 0.04)
    shifted = strategy.targets(logits + 100.0, 0.04)  # exp(2500) would overflow without the shift
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(q, shifted, atol=1e-4, rtol=1e-3)  # float32 rounding of logits + 100
    assert dict(strategy.state_dict()) == {}


def _sinkhorn_worker(rank: int, store: str, logits: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        half = logits.shape[0] // 2
        torch.save(sinkhorn_knopp(logits[rank * half:(rank + 1) * half], 0.5), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_sums_are_reduced_over_processes(tmp_path):
    """Two processes with half a batch each get exactly the rows of one process with all of it."""
    import torch.multiprocessing as mp

    logits = torch.randn(24, 12, generator=torch.Generator().manual_seed(6))
    out = str(tmp_path / "q")
    mp.spawn(_sinkhorn_worker, args=(str(tmp_path / "store"), logits, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    torch.testing.assert_close(torch.cat(parts), sinkhorn_knopp(logits, 0.5), atol=1e-6, rtol=1e-5)


# -- KoLeo ------------------------------------------------------------------------------------


def reference_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(-np.log(d.min(axis=1) + eps).mean())


def test_koleo_matches_an_independent_computation():
    x = torch.randn(10, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(reference_koleo(x.numpy()), rel=1e-6)
    strategy = build_collapse_strategy("centering,koleo", **KW)
    views = torch.randn(20, 7, generator=torch.Generator().manual_seed(3), requires_grad=True)
    reg = strategy.regularizer(views, torch.zeros(40, 12))
    expected = 0.1 * (reference_koleo(views[:10].detach().numpy()) + reference_koleo(views[10:].detach().numpy()))
    assert reg.item() == pytest.approx(expected, rel=1e-5)
    reg.backward()  # a loss term: gradients reach the embeddings
    assert views.grad is not None and views.grad.abs().sum() > 0
    assert strategy.metrics()["koleo"] == pytest.approx(expected, rel=1e-5)


def test_none_is_the_plain_sharpened_softmax():
    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    q = build_collapse_strategy("none", **KW).targets(logits, 0.5)
    e = np.exp(logits.numpy() / 0.5)
    np.testing.assert_allclose(q.numpy(), e / e.sum(axis=1, keepdims=True), rtol=1e-5)


# -- combinations -----------------------------------------------------------------------------


def test_combination_nests_state_and_delegates():
    combined = build_collapse_strategy("centering,koleo", **KW)
    assert isinstance(combined, CombinedStrategy)
    assert list(combined.state_dict()) == ["centering.center"]
    alone = build_collapse_strategy("centering", **KW)
    assert list(alone.state_dict()) == ["center"]  # a single strategy keeps its own keys
    logits = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    for s in (alone, combined):
        s.update(logits)
    torch.testing.assert_close(combined.targets(logits, 0.04), alone.targets(logits, 0.04))
    torch.testing.assert_close(combined.state_dict()["centering.center"], alone.state_dict()["center"])
    assert combined.metrics()["center_norm"] == pytest.approx(alone.metrics()["center_norm"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("koleo", "no strategy that makes teacher targets"),
        ("centering,sinkhorn-knopp", "2 strategies that make teacher targets"),
        ("centring,koleo", "Did you mean 'centering'"),
        ("centering,,koleo", "empty name"),
        ("koleo,centering,koleo", "more than once"),
    ],
)
def test_bad_combinations_are_clear_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        build_collapse_strategy(spec, **KW)


def test_cli_rejects_a_regulariser_alone_in_one_line(cli, tmp_path):
    from PIL import Image

    from dinocli.cli import app

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 60, 10, 200)).save(tmp_path / "img" / f"{i}.png")
    result = cli.invoke(app, ["pretrain", "--data", str(tmp_path / "img"), "--output", str(tmp_path / "r"),
                              "--collapse", "koleo", "--arch", "vit_tiny", "--out-dim", "16",
                              "--global-crop-size", "32", "--local-crop-size", "16", "--batch-size", "2"])
    assert result.exit_code == 2
    assert not (tmp_path / "r" / "checkpoint.pth").exists()
    assert "error:" in result.output and "--collapse 'koleo'" in result.output
    assert "Traceback" not in result.output


# -- they prevent collapse on a tiny problem ----------------------------------------------------


def train_tiny(spec: str, steps: int = 150, seed: int = 0) -> dict[str, float]:
    """Direct DINO optimisation of a tiny MLP "backbone" + linear head on 64 fixed random
    points, two noisy views each (a faster, honest stand-in for images); teacher = EMA(0.9)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, d_in, k, b = 64, 32, 32, 32
    x = torch.randn(n, d_in, generator=g)
    student = nn.ModuleDict(
        dict(backbone=nn.Sequential(nn.Linear(d_in, 64), nn.GELU(), nn.Linear(64, 16)), head=nn.Linear(16, k))
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    strategy = build_collapse_strategy(spec, out_dim=k, n_global=2, n_crops=2, student_temp=0.1)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:b]
        views = torch.cat([x[idx] + torch.randn(b, d_in, generator=g) for _ in range(2)])
        emb = student["backbone"](views)
        logits = student["head"](emb)
        with torch.no_grad():
            t_logits = teacher["head"](teacher["backbone"](views))
        loss = multicrop_cross_entropy(logits, strategy.targets(t_logits, 0.04), 2, 0.1)
        reg = strategy.regularizer(emb, logits)
        loss = loss if reg is None else loss + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(0.9).add_(ps, alpha=0.1)
        strategy.update(t_logits)
    with torch.no_grad():
        views = torch.cat([x, x])
        t_emb = teacher["backbone"](views)
        targets = strategy.targets(teacher["head"](t_emb), 0.04)
        return batch_diagnostics(targets, student["head"](student["backbone"](views)), t_emb, 2)


def test_none_collapses_and_every_strategy_prevents_it():
    collapsed = train_tiny("none")
    assert collapsed["teacher_prototypes"] <= 2 and collapsed["top_prototype_share"] > 0.9
    assert collapsed["teacher_entropy"] < 0.1  # one prototype, with certainty: dominant collapse
    for spec in ("centering", "sinkhorn-knopp", "centering,koleo", "sinkhorn-knopp,koleo"):
        d = train_tiny(spec)
        assert d["teacher_prototypes"] >= 12, (spec, d)
        assert d["top_prototype_share"] < 0.3, (spec, d)
    # KoLeo's own effect: it spreads the embeddings that `none` lets shrink.
    spread = train_tiny("none,koleo")
    assert spread["embedding_std"] > 1.5 * collapsed["embedding_std"]
    assert spread["effective_rank"] > collapsed["effective_rank"] + 2


# -- in training: state in the checkpoint, resume refuses another strategy ----------------------


def test_combined_strategy_is_checkpointed_and_resume_refuses_a_change(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    opts = dict(
        data=str(images), output=str(tmp_path / "run"), arch="vit_tiny", patch_size=16, out_dim=16,
        global_crop_size=32, local_crop_size=16, local_crops_number=1, batch_size=4, epochs=1,
        warmup_epochs=0, num_workers=0, precision="fp32", progress=False, log_every=1, saveckp_freq=0,
        collapse="sinkhorn-knopp,koleo",
    )
    pretrain(resolve_config(overrides=opts))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["collapse"] == "sinkhorn-knopp,koleo" and dict(ckpt["strategy"]) == {}
    with pytest.raises(UsageError, match="collapse"):
        pretrain(resolve_config(overrides={**opts, "epochs": 2, "collapse": "sinkhorn-knopp"}))
    opts2 = {**opts, "output": str(tmp_path / "run2"), "collapse": "centering,koleo"}
    pretrain(resolve_config(overrides=opts2))
    ckpt2 = torch.load(tmp_path / "run2" / "checkpoint.pth", weights_only=True)
    assert list(ckpt2["strategy"]) == ["centering.center"] and ckpt2["strategy"]["centering.center"].abs().sum() > 0
    resumed = pretrain(resolve_config(overrides={**opts2, "epochs": 2}))  # same strategy: resumes
    assert resumed.epochs == 2
