"""``dino linear``: both modes from features files and image folders, classifier files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinocli.cli import app
from dinocli.evaluate import Features, load_classifier, save_features
from dinocli.evaluate.linear import accuracy

TINY_VIT = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--depth", "2", "--crop-size", "32"]


def write_features(path: Path, n: int, dim: int, classes: int, seed: int, **meta) -> Features:
    centers = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99 + dim))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = Features(centers[labels] + 2 * torch.randn(n, dim, generator=g), labels,
                     [f"class_{i}" for i in range(classes)], metadata={"n_last_blocks": 1, **meta})  # fmt: skip
    save_features(path, feats)
    return feats


def test_fast_mode_json_classifier_file_and_evaluate(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "train.safetensors", 200, 16, 4, seed=1)
    val = write_features(tmp_path / "val.safetensors", 80, 16, 4, seed=2)
    files = ["--train", str(tmp_path / "train.safetensors"), "--val", str(tmp_path / "val.safetensors")]
    clf, out = tmp_path / "clf.safetensors", tmp_path / "r.json"
    result = cli.invoke(app, ["linear", *files, "--lr", "0.001", "--lr", "0.1", "--lr", "1", "--weight-decay", "0",
                              "--weight-decay", "1e-4", "--epochs", "5", "-o", str(clf), "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "fast" and len(data["sweep"]) == 6 and data["num_holdout"] == 20
    assert (data["num_train"], data["num_val"], data["num_classes"], data["epochs"]) == (200, 80, 4, 5)
    assert "picked" in result.stdout and f"val top-1 {data['top1']:.2f} %" in result.stdout
    loaded = load_classifier(clf)
    assert accuracy(loaded.logits(val.features), val.labels) == (pytest.approx(data["top1"]), None)
    assert loaded.metadata["lr"] == data["lr"] and loaded.classes == [f"class_{i}" for i in range(4)]
    again = cli.invoke(app, ["linear", "--evaluate", str(clf), "--val", str(tmp_path / "val.safetensors"),
                             "--json", str(tmp_path / "e.json")])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(data["top1"])
    assert f"top-1 {data['top1']:.2f} %" in again.stdout


def test_reference_mode_on_features_files(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "train.safetensors", 60, 8, 3, seed=1)
    write_features(tmp_path / "val.safetensors", 30, 8, 3, seed=2)
    out = tmp_path / "r.json"
    result = cli.invoke(app, ["linear", "--mode", "reference", "--train", str(tmp_path / "train.safetensors"),
                              "--val", str(tmp_path / "val.safetensors"), "--epochs", "4", "--val-every", "2",
                              "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "reference" and data["lr"] == 0.001
    assert [h["epoch"] for h in data["history"]] == [0, 2, 3]  # every 2nd epoch and the last
    assert data["best_top1"] == max(h["top1"] for h in data["history"])
    assert "no augmentation" in result.stderr and "what eval_linear.py prints" in result.stdout


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_one_step_form_on_image_folders(image_folder_tree: Path, tmp_path: Path, cli, mode: str) -> None:
    out, clf = tmp_path / "r.json", tmp_path / "clf.safetensors"
    result = cli.invoke(app, ["linear", "--mode", mode, *TINY_VIT, "--train-data", str(image_folder_tree / "train"),
                              "--val-data", str(image_folder_tree / "val"), "--epochs", "2", "--lr", "0.1",
                              "--holdout", "0", "--num-workers", "0", "--device", "cpu", "--precision", "fp32",
                              "--json", str(out), "-o", str(clf)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["num_train"], data["num_val"], data["num_classes"]) == (6, 4, 2)
    loaded = load_classifier(clf)
    features = loaded.metadata["features"]
    assert features["n_last_blocks"] == 2 and loaded.dim == 2 * 192  # eval_linear.py's 4, capped at the depth
    assert features["preprocessing"]["crop_size"] == 32 and features["preprocessing"]["resize"] == 37
    assert loaded.metadata["mode"] == mode and loaded.metadata.get("augmented", False) == (mode == "reference")
    # --evaluate re-extracts the val images with the classifier's feature options
    again = cli.invoke(app, ["linear", "--evaluate", str(clf), *TINY_VIT, "--val-data", str(image_folder_tree / "val"),
                             "--num-workers", "0", "--device", "cpu", "--precision", "fp32",
                             "--json", str(tmp_path / "e.json")])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(data["top1"])


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("dim", [], "the train features are 16-dimensional but the val features are 8-dimensional"),
        ("unlabelled", [], "the val set is unlabelled"),
        ("one_class", [], "the train set has images of 1 class; a classifier needs at least 2"),
        ("ok", ["--mode", "sgd"], "--mode must be fast or reference"),
        ("ok", ["--mode", "reference", "--lr", "0.1", "--lr", "1"], "--mode reference trains one --lr"),
        ("ok", ["--epochs", "0"], "--epochs must be at least 1"),
        ("ok", ["--lr", "-1"], "learning rates must be positive"),
        ("ok", ["--holdout", "0"], "need a held-out part of train"),
        ("ok", ["--holdout", "1"], "--holdout must be in [0, 1)"),
        ("missing", [], "features file not found"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, cli, setup: str, args: list[str], message: str) -> None:
    train, val = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    write_features(train, 40, 16, 3, seed=1)
    if setup == "dim":
        write_features(val, 10, 8, 3, seed=2)
    elif setup == "unlabelled":
        feats = write_features(val, 10, 16, 3, seed=2)
        save_features(val, Features(feats.features, torch.full((10,), -1)))
    elif setup == "one_class":
        write_features(val, 10, 16, 3, seed=2)
        save_features(train, Features(torch.randn(40, 16), torch.zeros(40)))
    elif setup == "ok":
        write_features(val, 10, 16, 3, seed=2)
    result = cli.invoke(app, ["linear", "--train", str(train), "--val", str(val), "--epochs", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_cli_input_forms_and_evaluate_errors(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "t.safetensors", 30, 8, 3, seed=1, weights="a.pth", weights_sha256="a" * 64)
    other = write_features(tmp_path / "v4.safetensors", 30, 8, 3, seed=2, n_last_blocks=4)
    write_features(tmp_path / "b.safetensors", 30, 8, 3, seed=2, weights="b.pth", weights_sha256="b" * 64)
    b = str(tmp_path / "b.safetensors")
    torch.save({"teacher": {}}, tmp_path / "checkpoint.pth")
    clf = tmp_path / "clf.safetensors"
    ok = cli.invoke(app, ["linear", "--train", str(tmp_path / "t.safetensors"), "--val", str(tmp_path / "t.safetensors"),
                          "--lr", "0.1", "--holdout", "0", "--epochs", "1", "-o", str(clf)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    empty = tmp_path / "empty"
    empty.mkdir()
    t = str(tmp_path / "t.safetensors")
    cases = [
        ([], "give --train and --val features files, or --weights"),
        (["--train", t], "give both --train and --val"),
        (["--train", t, "--train-data", str(tmp_path)], "give either --train/--val"),
        (["--train-data", str(empty)], "give both --train-data and --val-data"),
        (["--train-data", str(empty), "--val-data", str(empty), *TINY_VIT], "no images"),
        (["--evaluate", str(clf), "--train", t, "--val", t], "--evaluate takes a val set only"),
        (["--evaluate", str(clf)], "--evaluate needs --val"),
        (["--evaluate", str(clf), "--val", str(tmp_path / "v4.safetensors")], "--n-last-blocks 1, these have 4"),
        (["--evaluate", str(tmp_path / "t.safetensors"), "--val", t], "not a dinocli linear classifier"),
        (["--evaluate", str(clf), "--val", b], "the classifier was trained on features extracted differently "
                                               "(different weights files (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb: a.pth vs b.pth))"),
        (["--train", t, "--val", b], "the train and val features were extracted differently (different weights files"),
        (["--train", str(tmp_path / "checkpoint.pth"), "--val", t], "checkpoint.pth is a PyTorch checkpoint, not a "
                                                                     "features file: give weights as --weights"),
        (["--train", t, "--val", t, "-o", str(tmp_path)], "is a folder"),
        (["--train", t, "--val", t, "--json", str(tmp_path)], f"--json {tmp_path} is a folder; give a file name"),
        (["--mode", "reference", "--lr", "1", "--lr", "2", *TINY_VIT, "--train-data", str(empty), "--val-data",
          str(empty)], "trains one --lr"),  # before the images are listed
    ]
    for args, message in cases:
        result = cli.invoke(app, ["linear", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)
    assert len(other) == 30
