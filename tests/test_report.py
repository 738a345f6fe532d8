"""``dino report RUN``: PNG charts that open, an HTML page that embeds and links them, clear errors."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from dinocli.cli import app
from dinocli.report import Chart, Series, nice_ticks, render_chart
from dinocli.report.charts import tick_label


def write_run(run, n: int = 30, warn_at: int | None = 20) -> None:
    """A run folder with a metrics.jsonl as `dino pretrain` writes it (5 iterations per epoch)."""
    run.mkdir(parents=True)
    (run / "config.toml").write_text('arch = "vit_tiny"\nout_dim = 64\ncollapse = "centering"\n')
    lines = []
    for it in range(1, n + 1):
        record = {
            "epoch": (it - 1) // 5, "iteration": it, "loss": 4.1 - it * 0.05, "lr": 1e-4 * it / n,
            "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04, "images_per_s": 100.0,
            "teacher_entropy": 3.0 - it * 0.02, "student_entropy": 3.5, "kl_teacher_student": 0.5,
            "teacher_max_prob": 0.2, "teacher_prototypes": 10, "top_prototype_share": 0.1,
            "embedding_std": 0.05, "effective_rank": 9.0, "center_norm": None if it == 7 else 0.1,
        }
        if it == warn_at:
            record["collapse_warning"] = "uniform"
        lines.append(json.dumps(record))
        if it % 5 == 0:
            lines.append(json.dumps({"epoch": it // 5 - 1, "iteration": it, "loss": 4.0, "summary": "epoch"}))
            lines.append(json.dumps({"epoch": it // 5 - 1, "iteration": it, "knn_top1": 20.0 + it,
                                     "knn_k": 20, "summary": "knn"}))
    lines.append('{"epoch": 6, "iteration": 31, "lo')  # a line cut short by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_writes_pngs_that_open_and_an_html_page_that_holds_them(tmp_path, cli):
    run = tmp_path / "run"
    write_run(run)
    result = cli.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    folder = run / "report"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    expected = {"loss", "knn", "lr", "momentum", "teacher_temp", "entropy", "kl", "prototypes",
                "embedding_std", "effective_rank", "center_norm"}
    assert {f"{name}.png" for name in expected} <= set(pngs)
    assert "koleo.png" not in pngs  # no data, no chart
    html = (folder / "index.html").read_text()
    for name in pngs:
        with Image.open(folder / name) as img:
            img.load()
            assert img.size == (640, 360)
            assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # really drawn
        assert f'href="{name}"' in html
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(pngs)
    assert base64.b64decode(embedded[0]) == (folder / "loss.png").read_bytes()
    assert "http://" not in html and "https://" not in html  # offline: nothing to fetch
    assert "collapse warning (uniform) at iteration 20" in html
    assert "best k-NN top-1" in html and "50.00 %" in html
    assert str(folder / "index.html") in result.output


def test_report_output_option_and_run_without_diagnostics(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "iteration": 1, "loss": 2.0}) + "\n")
    out = tmp_path / "elsewhere"
    result = cli.invoke(app, ["report", str(run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "loss.png"]
    assert not (run / "report").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "run folder not found"),
        ("metrics-file", "{tmp}/run/metrics.jsonl is a file; give the run folder that holds metrics.jsonl "
                         "(its folder {tmp}/run?)"),
        ("no-metrics", "metrics.jsonl not found"),
        ("empty", "holds no metrics yet"),
        ("garbage", "metrics.jsonl holds no metrics records (JSON objects with an 'iteration'): is it a dinocli log?"),
        ("bad-iteration", "metrics.jsonl, line 2: 'iteration' is 'x', not a number"),
        ("output-file", "--output {tmp}/taken is a file; give a folder"),
        ("output-under-file", "--output {tmp}/taken/report: {tmp}/taken is a file, not a folder"),
    ],
)
def test_report_errors_are_one_line_with_exit_code_2(tmp_path, cli, setup, message):
    run = tmp_path / "run"
    if setup in ("no-metrics", "empty", "garbage", "bad-iteration"):
        run.mkdir()
    if setup == "empty":
        (run / "metrics.jsonl").write_text("\n")
    if setup == "garbage":
        (run / "metrics.jsonl").write_text("epoch 1 loss 2.0\n[1, 2]\n")
    if setup == "bad-iteration":
        (run / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n{"iteration": "x", "loss": "NaN"}\n')
    extra = []
    if setup.startswith("output"):
        write_run(run)
        (tmp_path / "taken").write_text("not a folder")
        extra = ["--output", str(tmp_path / ("taken" if setup == "output-file" else "taken/report"))]
    if setup == "metrics-file":
        write_run(run)
        run = run / "metrics.jsonl"
    message = message.format(tmp=tmp_path)
    result = cli.invoke(app, ["report", str(run), *extra])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(3, 97) == [0, 25, 50, 75, 100]
    assert nice_ticks(0, 7) == [0, 2, 4, 6, 8]
    ticks = nice_ticks(1.7e-6, 1.6e-4)
    steps = np.diff(ticks)
    assert ticks[0] <= 1.7e-6 and ticks[-1] >= 1.6e-4 and np.allclose(steps, steps[0])
    assert nice_ticks(5, 5)[0] < 5 < nice_ticks(5, 5)[-1]
    assert [tick_label(v) for v in (0, 0.25, 1200, 1.5e-5)] == ["0", "0.25", "1200", "1.5e-5"]


def test_chart_draws_each_series_where_its_values_are():
    # A flat red line at y = 1 and a flat blue line at y = 0 on the y range [0, 1]: red above blue.
    chart = Chart("t", [Series("a", [0, 10], [1.0, 1.0], color="#ff0000"),
                        Series("b", [0, 10], [0.0, 0.0], color="#0000ff")])
    img = np.asarray(render_chart(chart, 400, 300)).astype(int)
    red = np.argwhere((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60))
    blue = np.argwhere((img[..., 2] > 200) & (img[..., 0] < 60) & (img[..., 1] < 60))
    assert len(red) > 50 and len(blue) > 50
    assert red[:, 0].mean() < blue[:, 0].mean()
    assert math.isclose(np.median(red[:, 0]), 36, abs_tol=3)  # the top of the plot area
    assert math.isclose(np.median(blue[:, 0]), 300 - 44, abs_tol=3)  # the bottom
    buf = io.BytesIO()
    render_chart(Chart("empty", [Series("a", [], [])])).save(buf, format="PNG")  # no data: no crash
