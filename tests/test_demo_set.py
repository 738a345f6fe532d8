"""The built-in demo data set: layout, counts, balance, determinism, atomic generation, cache folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dinocli.data import demo_set as demo_data
from dinocli.data import image_folder, open_rgb
from dinocli.data.demo_set import CLASSES, demo_dataset, demo_image
from dinocli.errors import DinoError


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_layout_counts_and_balance(tmp_path):
    root = demo_dataset(tmp_path, train_per_class=6, val_per_class=2, size=32)
    assert root.parent == tmp_path and root.name.startswith("demo-v2")
    for split, per_class in (("train", 6), ("val", 2)):
        paths, labels, classes = image_folder(root / split)
        assert classes == sorted(CLASSES) and len(classes) == 10
        assert np.bincount(labels).tolist() == [per_class] * 10
        assert all(open_rgb(p).size == (32, 32) for p in paths[:: per_class])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_same_bytes_every_time(tmp_path):
    a = demo_dataset(tmp_path / "a", train_per_class=3, val_per_class=1, size=48, seed=2)
    b = demo_dataset(tmp_path / "b", train_per_class=3, val_per_class=1, size=48, seed=2)
    c = demo_dataset(tmp_path / "c", train_per_class=3, val_per_class=1, size=48, seed=3)
    assert digest(a) == digest(b) != digest(c)
    assert open_rgb(a / "train" / "spokes" / "0000.png").size == (48, 48)


def test_images_vary_within_a_class_and_are_not_blank():
    images = [np.asarray(demo_image(CLASSES.index("dots"), i), dtype=float) for i in range(20)]
    assert all(im.std() > 10 for im in images)
    mean_colours = np.array([im.mean(axis=(0, 1)) for im in images])
    assert mean_colours.std(axis=0).min() > 15  # random colours, so colour alone does not give the class


def test_classes_differ_in_pattern_not_in_average_colour():
    """The mean image of each class is nearly flat: colour, phase and orientation are random."""
    for label in range(10):
        mean = np.mean([np.asarray(demo_image(label, i), dtype=float) for i in range(60)], axis=0)
        assert mean.mean(axis=2).std() < 25, CLASSES[label]


def test_reused_when_complete_and_half_sets_never_appear(tmp_path, monkeypatch):
    root = demo_dataset(tmp_path, train_per_class=2, val_per_class=1)
    stamp = (root / "train" / "rings" / "0000.png").stat().st_mtime_ns
    assert demo_dataset(tmp_path, train_per_class=2, val_per_class=1) == root
    assert (root / "train" / "rings" / "0000.png").stat().st_mtime_ns == stamp

    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = demo_data.demo_image
    monkeypatch.setattr(demo_data, "demo_image", crash)
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        demo_dataset(other, train_per_class=2, val_per_class=1)
    assert list(other.iterdir()) == []  # nothing, not half a set


def test_incomplete_folder_is_reported(tmp_path):
    (tmp_path / "demo-v2-s32-t2-v1-seed0" / "train").mkdir(parents=True)
    with pytest.raises(DinoError, match="not a complete demo data set"):
        demo_dataset(tmp_path, train_per_class=2, val_per_class=1)


def test_default_location_follows_dinocli_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCLI_CACHE", str(tmp_path / "cache"))
    assert demo_data.cache_dir() == tmp_path / "cache"
    root = demo_dataset(train_per_class=1, val_per_class=1)
    assert root.parent == tmp_path / "cache" / "demo"
    monkeypatch.delenv("DINOCLI_CACHE")
    assert demo_data.cache_dir() == Path.home() / ".cache" / "dinocli"


@pytest.mark.slow
def test_default_set_is_2000_plus_500_images_and_fast(tmp_path):
    import time

    start = time.perf_counter()
    root = demo_dataset(tmp_path)
    took = time.perf_counter() - start
    assert root == tmp_path / "demo-v2"
    assert len(list((root / "train").rglob("*.png"))) == 2000
    assert len(list((root / "val").rglob("*.png"))) == 500
    assert took < 60, took  # about 5 s on one idle core; generous for a shared machine
