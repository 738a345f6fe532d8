"""``dino report RUN``: charts of ``RUN/metrics.jsonl`` as PNG files and one HTML page."""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinocli.errors import UsageError
from dinocli.io import atomic_write_bytes, atomic_write_text, check_output_path
from dinocli.report.charts import Chart, Series, render_chart
from dinocli.report.metrics import kind, load_metrics, series
from dinocli.report.page import Figure, html_page

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: name -> (title, y label, [(metrics key, legend label, record kind)]); drawn when any key has data.
CHARTS: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "loss": ("Loss", "loss", [("loss", "per iteration", "iteration"), ("loss", "epoch mean", "epoch")]),
    "knn": ("k-NN top-1 of the teacher (k=20)", "top-1 %", [("knn_top1", "k-NN top-1", "knn")]),
    "lr": ("Learning rate", "lr", [("lr", "lr", "iteration")]),
    "wd": ("Weight decay", "wd", [("wd", "weight decay", "iteration")]),
    "momentum": ("Teacher momentum", "momentum", [("momentum", "momentum", "iteration")]),
    "teacher_temp": ("Teacher temperature", "temperature", [("teacher_temp", "teacher temp", "iteration")]),
    "entropy": (
        "Entropies (nats)", "entropy",
        [("teacher_entropy", "teacher", "iteration"), ("student_entropy", "student", "iteration")],
    ),
    "kl": ("KL(teacher || student)", "nats", [("kl_teacher_student", "KL", "iteration")]),
    "prototypes": (
        "Distinct teacher argmax prototypes in the batch", "prototypes",
        [("teacher_prototypes", "prototypes", "iteration")],
    ),
    "sharpness": (
        "Teacher sharpness", "fraction",
        [("teacher_max_prob", "mean max probability", "iteration"),
         ("top_prototype_share", "share of the top prototype", "iteration")],
    ),
    "embedding_std": (
        "Embedding spread (std of L2-normalised embeddings)", "std",
        [("embedding_std", "std", "iteration")],
    ),
    "effective_rank": ("Effective rank of the embeddings", "rank", [("effective_rank", "rank", "iteration")]),
    "center_norm": ("Center norm", "norm", [("center_norm", "center norm", "iteration")]),
    "koleo": ("KoLeo term (weighted)", "loss", [("koleo", "KoLeo", "iteration")]),
    "images_per_s": ("Throughput", "images/s", [("images_per_s", "images/s", "iteration")]),
    "data_wait": (
        "Time waiting for data-loading workers", "share of the time", [("data_wait", "waiting for data", "iteration")],
    ),
}


@dataclass
class ReportResult:
    """What ``dino report`` wrote."""

    folder: Path
    html: Path
    images: list[Path] = field(default_factory=list)


def read_config(run: Path) -> tuple[dict[str, Any], str]:
    """``RUN/config.toml`` as values and text (empty when absent or unreadable)."""
    path = run / "config.toml"
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text), text
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}, ""


def build_charts(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Chart]:
    """The charts that have data, by file stem, in :data:`CHARTS` order."""
    warnings = [(float(r["iteration"]), "collapse warning") for r in records if r.get("collapse_warning")]
    charts = {}
    for name, (title, y_label, keys) in CHARTS.items():
        lines = []
        for key, label, of in keys:
            xs, ys = series(records, key, of)
            if any(y is not None for y in ys):
                lines.append(Series(label, xs, ys, markers=of != "iteration"))
        if not lines:
            continue
        out_dim = config.get("out_dim")
        if name == "entropy" and isinstance(out_dim, int) and out_dim > 1:
            xs = [min(x for s in lines for x in s.xs), max(x for s in lines for x in s.xs)]
            lines.append(Series("ln(out_dim): uniform", xs, [math.log(out_dim)] * 2, color="#999999"))
        events = warnings if name in ("loss", "entropy", "prototypes", "embedding_std") else []
        charts[name] = Chart(title, lines, "iteration", y_label, events)
    return charts


def summarise(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Key figures of the run for the page's table."""
    its = [r for r in records if kind(r) == "iteration"]
    epochs = [r for r in records if kind(r) == "epoch"]
    knn = [r for r in records if kind(r) == "knn" and r.get("knn_top1") is not None]
    rows = [("iterations logged", str(len(its))), ("last iteration", str(records[-1]["iteration"])),
            ("epochs completed", str(len(epochs)))]
    if epochs and epochs[-1].get("loss") is not None:
        rows.append(("last epoch loss", f"{epochs[-1]['loss']:.4f}"))
    if knn:
        best = max(knn, key=lambda r: r["knn_top1"])
        rows.append(("last k-NN top-1", f"{knn[-1]['knn_top1']:.2f} % (epoch {knn[-1].get('epoch', 0) + 1})"))
        rows.append(("best k-NN top-1", f"{best['knn_top1']:.2f} % (epoch {best.get('epoch', 0) + 1})"))
    last = its[-1] if its else {}
    for key in ("teacher_entropy", "teacher_prototypes", "embedding_std", "effective_rank"):
        if isinstance(last.get(key), (int, float)):
            rows.append((f"last {key.replace('_', ' ')}", f"{last[key]:.4g}"))
    return rows


def render_report(run: str | Path, output: str | Path | None = None) -> ReportResult:
    """Write ``<name>.png`` charts and ``index.html`` of ``run``'s metrics into ``output``.

    ``output`` defaults to ``RUN/report``. Every file is written atomically.
    """
    run = Path(run)
    if run.is_file():
        hint = f" (its folder {run.parent}?)" if (run.parent / "metrics.jsonl").is_file() else ""
        raise UsageError(f"{run} is a file; give the run folder that holds metrics.jsonl{hint}")
    if not run.is_dir():
        raise UsageError(f"run folder not found: {run}")
    records = load_metrics(run / "metrics.jsonl")
    config, config_text = read_config(run)
    folder = Path(output) if output is not None else run / "report"
    check_output_path(folder, "--output", folder=True)
    figures, images = [], []
    for name, chart in build_charts(records, config).items():
        buffer = io.BytesIO()
        render_chart(chart).save(buffer, format="PNG", optimize=True)
        png = buffer.getvalue()
        atomic_write_bytes(folder / f"{name}.png", png)
        images.append(folder / f"{name}.png")
        figures.append(Figure(f"{name}.png", png, chart.title))
    warnings = [
        f"collapse warning ({r['collapse_warning']}) at iteration {r['iteration']}"
        for r in records if r.get("collapse_warning")
    ]
    subtitle = f"{run.resolve()} - {config.get('arch', '?')}, out_dim {config.get('out_dim', '?')}, " \
               f"collapse {config.get('collapse', '?')}"
    page = html_page(f"dino report: {run.resolve().name}", subtitle, summarise(records), warnings,
                     figures, config_text)
    atomic_write_text(folder / "index.html", page)
    return ReportResult(folder, folder / "index.html", images)


__all__ = ["CHARTS", "ReportResult", "build_charts", "render_report", "summarise"]
