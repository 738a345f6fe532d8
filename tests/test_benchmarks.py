"""The benchmark scripts run end to end at tiny sizes and report figures that make sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
