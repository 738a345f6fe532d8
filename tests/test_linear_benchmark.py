"""benchmarks/linear.py runs end to end at a tiny size, and dinocli's reference mode equals its plain loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "linear.py"


def test_linear_benchmark_smoke(image_folder_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    args = ["--data", str(image_folder_tree), "--random-only", "--arch", "vit_tiny", "--patch-size", "8", "--depth", "1",
            "--crop-size", "32", "--epochs", "2", "--image-epochs", "1", "--num-workers", "0", "--json", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    modes = [r["mode"] for r in rows if "mode" in r]
    assert modes[0].startswith("fast") and modes[1].startswith("plain reference x13") and len(modes) == 4
    ref = next(r for r in rows if "max_weight_difference" in r)
    assert ref["max_weight_difference"] < 1e-5 and ref["top1"] == ref["plain_top1_at_lr"]
    summary = next(r for r in rows if "speedup_fast_vs_13_plain" in r)
    assert summary["speedup_fast_vs_13_plain"] > 0
    assert "faster than 13 plain runs" in done.stdout and "threads" in done.stdout
