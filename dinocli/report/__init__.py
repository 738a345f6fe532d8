"""Training reports: ``dino report RUN`` draws ``RUN/metrics.jsonl`` as PNG charts and an HTML page."""

from dinocli.report.build import CHARTS, ReportResult, render_report
from dinocli.report.charts import Chart, Series, nice_ticks, render_chart
from dinocli.report.metrics import load_metrics, series

__all__ = [
    "CHARTS", "Chart", "ReportResult", "Series", "load_metrics", "nice_ticks", "render_chart",
    "render_report", "series",
]
