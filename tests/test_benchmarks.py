"""The benchmark scripts run end to end at tiny sizes and report figures that make sense."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_extract_benchmark(tmp_path):
    out = tmp_path / "extract.json"
    run_benchmark("extract.py", "--arch", "vit_tiny", "--img-size", "32", "--batch-size", "2", "--iters", "1",
                  "--device", "cpu", "--json", str(out))
    figures = json.loads(out.read_text())
    assert figures["fp32_max_relative_difference"] < 1e-4
    assert figures["bf16_min_cosine_to_fp32"] > 0.99
    assert min(figures["matmul_fp32_gflops"], figures["matmul_bf16_gflops"], figures["dinocli_bf16"]) > 0


def test_pretrain_step_benchmark():
    stdout = run_benchmark("pretrain_step.py", "--batch-size", "2", "--local-crops", "1", "--out-dim", "256",
                           "--iters", "1")
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("reference", "dinocli"))]
    assert [row[:2] for row in rows] == [["reference", "fp32"], ["dinocli", "fp32"], ["dinocli", "bf16"]]
    assert all(float(row[2]) > 0 for row in rows)


def test_knn_benchmark(tmp_path):
    out = tmp_path / "knn.json"
    run_benchmark("knn.py", "--num-train", "3000", "--num-val", "300", "--dim", "32", "--classes", "10",
                  "--json", str(out))
    figures = json.loads(out.read_text())
    assert figures["identical"] and figures["flat"]["accuracy"] == figures["reference"]["accuracy"]
    assert figures["ivf"]["recall"]["at_k"]["20"] >= 0.95  # nprobe is calibrated to it


def small_data_benchmark() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("small_data_benchmark", BENCHMARKS / "small_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_small_data_benchmark_trains_each_configuration_once(image_folder_tree, tmp_path, monkeypatch, capsys):
    bench = small_data_benchmark()
    trained = []

    def pretrain(cfg):
        trained.append((cfg.recipe, cfg.epochs, cfg.knn_every))
        history = []
        for epoch in range(cfg.epochs):
            history += [{"summary": "epoch", "epoch": epoch, "epoch_time_s": 30.0},
                        {"summary": "knn", "epoch": epoch, "knn_top1": 30.0 + epoch, "knn_time_s": 0.0}]
        return types.SimpleNamespace(history=history)

    monkeypatch.setattr(bench, "seconds_per_epoch", lambda *args, **kwargs: 60.0)
    monkeypatch.setattr(bench, "pretrain", pretrain)
    monkeypatch.setattr(bench.dinocli, "load_backbone", lambda path: path.parent.name)
    monkeypatch.setattr(bench, "backbone_for_eval", lambda **kwargs: ("raw" if kwargs.get("raw_pixels") else "random", None))
    monkeypatch.setattr(bench, "knn_top1", lambda model, data, size: {"raw": 38.0, "random": 28.0}.get(model, 33.0))
    monkeypatch.setattr(sys, "argv", ["small_data.py", "--data", str(image_folder_tree), "--minutes", "3",
                                      "--output", str(tmp_path / "runs"), "--recipes", "small-data", "reference",
                                      "small-data", "--curve"])
    bench.main()
    assert trained == [("small-data", 3, 1), ("reference", 3, 1)]
    table, curves = capsys.readouterr().out.split("machine:")[1].split("\n\n", 1)
    assert "small-data (= small-data: same configuration, not trained again)" in table
    assert [line.split()[-1] for line in table.splitlines()[2:]] == ["33.0%", "33.0%", "33.0%", "28.0%", "38.0%"]
    assert "1: 0.5 min 30.0%  2: 1 min 31.0%  3: 1.5 min 32.0%" in curves


def test_small_data_benchmark_set_overrides_every_recipe(image_folder_tree, tmp_path, monkeypatch, capsys):
    bench = small_data_benchmark()
    trained, random_init = [], []

    def pretrain(cfg):
        trained.append((cfg.recipe, cfg.arch, cfg.optimizer, cfg.lr, cfg.global_crops_scale))
        return types.SimpleNamespace(history=[])

    def backbone_for_eval(**kwargs):
        if not kwargs.get("raw_pixels"):
            random_init.append(kwargs["arch"])
        return "model", None

    monkeypatch.setattr(bench, "seconds_per_epoch", lambda *args, **kwargs: 60.0)
    monkeypatch.setattr(bench, "pretrain", pretrain)
    monkeypatch.setattr(bench.dinocli, "load_backbone", lambda path: "model")
    monkeypatch.setattr(bench, "backbone_for_eval", backbone_for_eval)
    monkeypatch.setattr(bench, "knn_top1", lambda model, data, size: 30.0)
    monkeypatch.setattr(sys, "argv", [
        "small_data.py", "--data", str(image_folder_tree), "--minutes", "2", "--output", str(tmp_path / "runs"),
        "--recipes", "small-data", "reference", "--set", "arch=resnet18", "--set", "optimizer=lars",
        "--set", "lr=0.3", "--set", "global-crops-scale=[0.2, 1.0]",
    ])
    bench.main()
    assert trained == [("small-data", "resnet18", "lars", 0.3, (0.2, 1.0)),
                       ("reference", "resnet18", "lars", 0.3, (0.2, 1.0))]
    assert set(random_init) == {"resnet18"}
    out = capsys.readouterr().out
    assert "small-data arch=resnet18 optimizer=lars lr=0.3 global_crops_scale=[0.2, 1.0]" in out
    # one row per distinct trained backbone: a ResNet ignores the recipes' different patch embeddings
    assert out.count("random init (resnet18)") == 1


DEFAULT_VIEWS = [(28, 28), (32, 32), (40, 40), (46, 40)]


@pytest.mark.parametrize("argv, views", [
    ([], DEFAULT_VIEWS), (["--eval-size", "32"], [(32, 32)]), (["--eval-size", "37/32", "40"], [(37, 32), (40, 40)]),
])
def test_small_data_benchmark_measures_every_row_at_every_eval_size(
    image_folder_tree, tmp_path, monkeypatch, capsys, argv, views
):
    # by default the data set's own size (48x40 px images: 40) and the sizes matched to each recipe's
    # 24-px global crops: 24 * 2 (1 - sqrt(0.35)) / 0.65 = 30.2 -> 32 for small-data, 24 * 2 (1 -
    # sqrt(0.4)) / 0.6 = 29.4 -> 28 for reference (4-px patches), then the reference's transform at the
    # data set's size: a 40-px centre crop of the images resized to ceil(40 * 256 / 224) = 46 px; every
    # row is measured in each way
    bench = small_data_benchmark()
    built, measured = [], []

    def backbone_for_eval(**kwargs):
        built.append(kwargs["img_size"])
        return "model", None

    monkeypatch.setattr(bench, "seconds_per_epoch", lambda *args, **kwargs: 60.0)
    monkeypatch.setattr(bench, "pretrain", lambda cfg: types.SimpleNamespace(history=[]))
    monkeypatch.setattr(bench.dinocli, "load_backbone", lambda path: "model")
    monkeypatch.setattr(bench, "backbone_for_eval", backbone_for_eval)
    monkeypatch.setattr(bench, "knn_top1", lambda model, data, view: measured.append(view) or sum(view))
    monkeypatch.setattr(sys, "argv", ["small_data.py", "--data", str(image_folder_tree), "--minutes", "2",
                                      "--output", str(tmp_path / "runs"), "--recipes", "small-data", "reference",
                                      "--set", "global_crop_size=24", "--set", "local_crop_size=12", *argv])
    bench.main()
    # built: random init of the two networks (patch projection, conv stem) and raw pixels; measured:
    # the two recipes, one random init (the stand-in model has no patches) and raw pixels, at each size
    assert built == [views[0][1]] * 3 and measured == [view for _ in range(4) for view in views]
    labels = [f"{r}/{c}" if r != c else str(c) for r, c in views]
    table = capsys.readouterr().out.split("machine:")[1].splitlines()
    assert table[1].split()[-len(views) * 2:] == [word for label in labels for word in (f"@{label}", "px")]
    assert all(row.split()[-len(views):] == [f"{sum(view):.1f}%" for view in views] for row in table[2:6])


@pytest.mark.parametrize("text", ["32/40", "a", "0", "37/"])
def test_small_data_benchmark_rejects_a_bad_eval_size(text):
    with pytest.raises(argparse.ArgumentTypeError):
        small_data_benchmark().parse_view(text)


@pytest.mark.parametrize("curve", [["--curve"], []])
def test_small_data_benchmark_curve_every_n_epochs(image_folder_tree, tmp_path, monkeypatch, capsys, curve):
    bench = small_data_benchmark()
    trained = []

    def pretrain(cfg):
        trained.append((cfg.knn_every, cfg.knn_train, cfg.knn_val))
        return types.SimpleNamespace(history=[
            {"summary": "epoch", "epoch": epoch, "epoch_time_s": 60.0} for epoch in range(cfg.epochs)
        ] + [{"summary": "knn", "epoch": epoch, "knn_top1": 30.0 + epoch, "knn_time_s": 5.0}
             for epoch in range(1, cfg.epochs, 2)])

    monkeypatch.setattr(bench, "seconds_per_epoch", lambda *args, **kwargs: 60.0)
    monkeypatch.setattr(bench, "pretrain", pretrain)
    monkeypatch.setattr(bench.dinocli, "load_backbone", lambda path: "model")
    monkeypatch.setattr(bench, "backbone_for_eval", lambda **kwargs: ("model", None))
    monkeypatch.setattr(bench, "knn_top1", lambda model, data, size: 30.0)
    monkeypatch.setattr(sys, "argv", ["small_data.py", "--data", str(image_folder_tree), "--minutes", "4",
                                      "--output", str(tmp_path / "runs"), "--recipes", "small-data",
                                      *curve, "--set", "knn_every=2"])
    bench.main()  # --set knn_every alone is enough: the k-NN folders default to the benchmark's data set
    assert trained == [(2, str(image_folder_tree / "train"), str(image_folder_tree / "val"))]
    assert "2: 2 min 31.0%  4: 4 min 33.0%" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["lr", "=3", "epochs=4"])
def test_small_data_benchmark_set_rejects_bad_overrides(text):
    bench = small_data_benchmark()
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_set(text)


def test_small_data_benchmark_refuses_an_unknown_option_in_one_line(image_folder_tree, tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "small_data.py"), "--data", str(image_folder_tree),
                           "--output", str(tmp_path), "--set", "learning_rate=0.1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "learning_rate" in done.stderr and "Traceback" not in done.stderr


def test_recipe_sweep_runs_each_plan_entry_in_its_own_process(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for cls in range(2):
            folder = tmp_path / "data" / split / f"class_{cls}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tiny = {"depth": 1, "patch_size": 16, "out_dim": 32, "local_crops_number": 2, "batch_size": 8,
            "precision": "fp32", "log_every": 1}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"recipe": "small-data", "runs": [
        {"name": "one block", "epochs": 2, "set": tiny},
        {"name": "random init", "random_init": {"depth": 1, "patch_size": 16}},
        {"name": "bad", "epochs": 1, "set": {**tiny, "lr": -1.0}},
    ]}))
    stdout = run_benchmark("recipe_sweep.py", str(plan), "--data", str(tmp_path / "data"), "--device", "cpu",
                           "--parallel", "3", "--workers", "0", "--threads", "1", "--output", str(tmp_path / "out"))
    results = {r["name"]: r for r in map(json.loads, (line for line in stdout.splitlines() if line.startswith("{")))}
    trained, random_init = results["one block"], results["random init"]
    assert trained["epochs"] == 2 and len(trained["curve"]) == 2  # k-NN every quarter of the run: each epoch
    assert all(0 <= r[view] <= 100 for r in (trained, random_init) for view in ("32", "40", "37/32"))
    assert "--lr must be a finite number >= 0" in results["bad"]["failed"]  # reported, the others still ran
    table = stdout.split("machine:")[1]
    assert "one block" in table and "not finished" in table
