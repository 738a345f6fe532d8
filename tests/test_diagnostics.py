"""Collapse diagnostics, the collapse detector, and k-NN monitoring during training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinocli.errors import UsageError
from dinocli.train import resolve_config
from dinocli.train.diagnostics import (
    DIAGNOSTIC_KEYS,
    CollapseDetector,
    batch_diagnostics,
    effective_rank,
    embedding_std,
)
from dinocli.train.loop import pretrain


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: far faster than two contending threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_batch_diagnostics_match_independent_formulas():
    rng = np.random.default_rng(0)
    b, k, d, n_crops = 5, 7, 6, 3
    targets = softmax(rng.normal(size=(2 * b, k)) * 3)
    student = rng.normal(size=(n_crops * b, k))
    emb = rng.normal(size=(2 * b, d))
    got = batch_diagnostics(torch.tensor(targets), torch.tensor(student), torch.tensor(emb), n_crops, 0.1)
    assert set(got) == set(DIAGNOSTIC_KEYS)

    h = lambda p: -(p * np.log(p)).sum(axis=-1)  # noqa: E731
    ps = softmax(student / 0.1)
    assert got["teacher_entropy"] == pytest.approx(h(targets).mean(), rel=1e-5)
    assert got["student_entropy"] == pytest.approx(h(ps).mean(), rel=1e-5)
    kls = [
        (targets[a * b:(a + 1) * b] * (np.log(targets[a * b:(a + 1) * b]) - np.log(ps[v * b:(v + 1) * b])))
        .sum(axis=-1).mean()
        for a in range(2) for v in range(n_crops) if v != a
    ]
    assert got["kl_teacher_student"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert got["teacher_max_prob"] == pytest.approx(targets.max(axis=-1).mean(), rel=1e-5)
    winners = targets.argmax(axis=-1)
    assert got["teacher_prototypes"] == len(set(winners.tolist()))
    assert got["top_prototype_share"] == pytest.approx(np.bincount(winners).max() / (2 * b))
    z = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert got["embedding_std"] == pytest.approx(z.std(axis=0).mean(), rel=1e-5)
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum()
    assert got["effective_rank"] == pytest.approx(np.exp(h(p)), rel=1e-4)


def test_spread_and_rank_of_collapsed_and_spread_embeddings():
    same = torch.ones(16, 8) * torch.arange(1.0, 9.0)
    assert embedding_std(same) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(3 * torch.eye(8)) == pytest.approx(8.0, rel=1e-5)


def collapsed_record(kind: str, iteration: int, epoch: int = 2, k: int = 64) -> dict:
    """A logged record built from constructed collapsed (or healthy) network outputs."""
    g = torch.Generator().manual_seed(iteration)
    b, d = 16, 32
    if kind == "uniform":
        targets = torch.softmax(torch.randn(2 * b, k, generator=g) * 0.01, dim=-1)
        emb = torch.randn(2 * b, d, generator=g)
    elif kind == "dominant":
        targets = torch.softmax(torch.randn(2 * b, k, generator=g) * 0.1 + 30 * torch.eye(k)[3], dim=-1)
        emb = torch.ones(2 * b, d) + 1e-4 * torch.randn(2 * b, d, generator=g)
    else:  # healthy: sharp, varied targets and spread embeddings
        targets = torch.softmax(torch.randn(2 * b, k, generator=g) * 8, dim=-1)
        emb = torch.randn(2 * b, d, generator=g)
    student = torch.log(targets.repeat(2, 1)) * 0.1
    record = batch_diagnostics(targets, student, emb, n_crops=4)
    loss = record["teacher_entropy"] + record["kl_teacher_student"]
    return {"epoch": epoch, "iteration": iteration, "loss": loss, **record}


@pytest.mark.parametrize("kind", ["uniform", "dominant"])
def test_detector_warns_once_with_advice_on_collapse(kind):
    messages = []
    detector = CollapseDetector(out_dim=64, embed_dim=32, warn=messages.append, patience=3)
    issued = [detector.check(collapsed_record(kind, it)) for it in range(10, 80, 10)]
    assert issued[:2] == [[], []] and issued[2] == [kind] and all(i == [] for i in issued[3:])
    assert len(messages) == 1
    assert f"{kind} collapse" in messages[0] and "since iteration 10" in messages[0]
    assert ("--teacher-temp" in messages[0]) and ("--collapse" in messages[0])


def test_detector_stays_quiet_on_healthy_outputs_early_epochs_and_interrupted_streaks():
    messages = []
    detector = CollapseDetector(out_dim=64, embed_dim=32, warn=messages.append, patience=3)
    for it in range(1, 40):
        detector.check(collapsed_record("healthy", it))
    for it in range(40, 60):  # collapsed-looking, but during the first epoch (start_epoch=1)
        detector.check(collapsed_record("dominant", it, epoch=0))
    for it in range(60, 90):  # never 3 collapsed records in a row
        detector.check(collapsed_record("uniform" if it % 3 else "healthy", it))
    assert messages == []


# -- in training --------------------------------------------------------------------------------


def make_labelled(root, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """One tiny run: vit_tiny/16, 32 px, 20 images, batch 5, 1 epoch, k-NN after it."""
    root = tmp_path_factory.mktemp("knn")
    make_labelled(root / "train", 10, 0)
    make_labelled(root / "val", 3, 1)
    cfg = resolve_config(overrides=dict(
        data=str(root / "train"), output=str(root / "run"), arch="vit_tiny", patch_size=16, out_dim=32,
        global_crop_size=32, local_crop_size=16, local_crops_number=1, batch_size=5, epochs=1,
        warmup_epochs=0, num_workers=0, precision="fp32", progress=False, log_every=2, saveckp_freq=0,
        knn_every=1, knn_train=str(root / "train"), knn_val=str(root / "val"),
    ))
    import io
    import sys

    captured, stderr = io.StringIO(), sys.stderr
    sys.stderr = captured
    try:
        history = pretrain(cfg).history
    finally:
        sys.stderr = stderr
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, records, captured.getvalue(), history


def test_diagnostics_are_logged_on_logged_iterations_and_shown(monitored_run):
    _, records, log, _ = monitored_run
    logged = [r for r in records if "summary" not in r]
    assert [r["iteration"] for r in logged] == [1, 2, 4]
    for r in logged:
        assert set(DIAGNOSTIC_KEYS) <= set(r) and "center_norm" in r
        assert 0 <= r["teacher_entropy"] <= math.log(32) + 1e-6
        assert 1 <= r["teacher_prototypes"] <= 10 and 1 <= r["effective_rank"] <= 10
    assert "teacher_entropy" in log and "embedding_std" in log and "teacher_prototypes" in log


def test_knn_monitor_logs_the_same_figure_as_dino_knn(monitored_run, cli):
    from dinocli.cli import app

    root, records, log, history = monitored_run
    knn = [r for r in records if r.get("summary") == "knn"]
    assert len(knn) == 1 and knn[0]["knn_k"] == 20 and knn[0]["iteration"] == 4
    summaries = [{k: v for k, v in r.items() if k != "time"} for r in records if "summary" in r]
    assert history == summaries  # the run's result holds what metrics.jsonl does (less the time stamp)
    assert "k-NN top-1 (k=20) of the teacher after epoch 1" in log
    out = root / "knn.json"
    result = cli.invoke(app, [
        "knn", "--weights", str(root / "run" / "checkpoint.pth"), "--train-data", str(root / "train"),
        "--val-data", str(root / "val"), "--resize", "37", "--crop-size", "32", "-k", "20",
        "--precision", "fp32", "--num-workers", "0", "--device", "cpu", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    top1 = json.loads(out.read_text())["results"][0]["top1"]
    assert knn[0]["knn_top1"] == pytest.approx(top1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"knn_every": 1}, "needs both --knn-train"),
        ({"knn_train": "x", "knn_val": "y"}, "only with --knn-every"),
        ({"knn_every": -1, "knn_train": "x", "knn_val": "y"}, "must not be negative"),
    ],
)
def test_knn_options_are_validated(extra, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        resolve_config(overrides={"data": "d", "output": str(tmp_path), **extra})


def test_knn_folders_are_checked_before_training(tmp_path):
    from dinocli.train.knn_monitor import KnnMonitor

    make_labelled(tmp_path / "small", 3, 0)
    with pytest.raises(UsageError, match="needs at least 20"):
        KnnMonitor(tmp_path / "small", tmp_path / "small", 1, 32)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UsageError, match="no class folders"):
        KnnMonitor(tmp_path / "flat", tmp_path / "small", 1, 32)
    with pytest.raises(UsageError, match="is not a folder"):
        KnnMonitor(tmp_path / "missing", tmp_path / "small", 1, 32)
