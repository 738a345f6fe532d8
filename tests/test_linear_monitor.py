"""``dino pretrain --linear-every``: the linear probe on the k-NN monitor's features, equal to ``dino linear``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinocli.errors import UsageError
from dinocli.evaluate import backbone_for_eval, extract_folder, linear_sweep, reference_resize
from dinocli.train import pretrain, resolve_config
from dinocli.train.knn_monitor import KnnMonitor


def make_labelled(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                root / name / f"{i}.png"
            )


def test_monitor_adds_the_fast_linear_probe_when_due(tmp_path: Path) -> None:
    make_labelled(tmp_path / "train", 10, 0)
    make_labelled(tmp_path / "val", 4, 1)
    monitor = KnnMonitor(tmp_path / "train", tmp_path / "val", every=1, crop_size=32, k=3, linear_every=2)
    model, _ = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=8, img_size=32, depth=1)
    assert monitor.due(1, 3) and "linear_top1" not in monitor.evaluate(model)
    assert monitor.due(2, 3)
    result = monitor.evaluate(model)
    options = dict(resize=reference_resize(32), crop_size=32)
    train, val = extract_folder(model, tmp_path / "train", **options), extract_folder(model, tmp_path / "val", **options)
    alone = linear_sweep(train, val, device="cpu")
    assert result["linear_top1"] == pytest.approx(alone.top1) and result["linear_lr"] == alone.lr
    assert monitor.due(3, 3) and "linear_top1" in monitor.evaluate(model)  # the last epoch always


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"linear_every": 2}, "--linear-every N runs on the k-NN monitor's features"),
        ({"linear_every": 3, "knn_every": 2, "knn_train": "x", "knn_val": "y"}, "multiple of M"),
        ({"linear_every": -1}, "must not be negative"),
    ],
)
def test_linear_every_is_validated(extra: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_config(overrides={"data": "d", "output": str(tmp_path), **extra})


def test_pretrain_logs_the_linear_probe(tmp_path: Path) -> None:
    make_labelled(tmp_path / "train", 10, 0)
    make_labelled(tmp_path / "val", 3, 1)
    cfg = resolve_config(overrides=dict(
        data=str(tmp_path / "train"), output=str(tmp_path / "run"), arch="vit_tiny", patch_size=16, depth=1,
        out_dim=32, global_crop_size=32, local_crop_size=16, local_crops_number=1, batch_size=5, epochs=1,
        warmup_epochs=0, num_workers=0, precision="fp32", progress=False, saveckp_freq=0,
        knn_every=1, linear_every=1, knn_train=str(tmp_path / "train"), knn_val=str(tmp_path / "val"),
    ))  # fmt: skip
    pretrain(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if r.get("summary") == "knn"]
    assert len(knn) == 1 and 0 <= knn[0]["linear_top1"] <= 100 and knn[0]["linear_time_s"] > 0
