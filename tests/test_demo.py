"""`dino demo`: the whole pipeline on built-in data, and pretraining clearly beats random init."""

from __future__ import annotations

import pytest

from dinocli.demo import run_demo
from dinocli.evaluate import load_features


@pytest.mark.slow
def test_demo_learns_and_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCLI_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", progress=False, attention_images=2, log=lines.append)

    # The learning check: DINO features separate the shape classes far better than the same
    # network at random initialisation (which mostly sees colour).
    assert report.knn_trained >= report.knn_random + 10, (report.knn_trained, report.knn_random)
    assert any("pretrained" in line and "random init" in line for line in lines)

    out = tmp_path / "demo"
    assert report.pretrain.checkpoint == out / "run" / "checkpoint.pth"
    assert report.pretrain.checkpoint.exists() and (out / "run" / "metrics.jsonl").exists()
    for name in ("trained", "random"):
        train = load_features(out / "features" / f"{name}-train.safetensors")
        val = load_features(out / "features" / f"{name}-val.safetensors")
        assert len(train) > len(val) > 0 and train.classes == val.classes and len(train.classes) == 10
    assert report.attention_index is not None and report.attention_index.exists()
    assert len(list((out / "attention").glob("*/grid.png"))) == 2
