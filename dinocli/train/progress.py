"""What a training run shows: a rich progress display or log lines (metrics go to :mod:`dinocli.loggers`)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


SHOWN = (
    "loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s", "data_wait",
    # collapse diagnostics (dinocli.train.diagnostics) and k-NN monitoring
    "teacher_entropy", "kl_teacher_student", "teacher_prototypes", "embedding_std", "knn_top1",
)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr", "wd") or (value != 0 and abs(value) < 1e-3):
            return f"{key} {value:.2e}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class TrainingDisplay:
    """A rich progress bar on stderr when it is a terminal, plain periodic log lines otherwise."""

    def __init__(self, epochs: int, iters_per_epoch: int, enabled: bool, rich: bool | None = None) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.rich = enabled and (self.console.is_terminal if rich is None else rich)
        self.epochs, self.iters_per_epoch = epochs, iters_per_epoch
        self._progress: Progress | None = None
        self._task = None

    def log(self, message: str) -> None:
        """A line of text on stderr (shown above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, done: int = 0) -> None:
        if not self.rich:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            f"epoch {epoch + 1}/{self.epochs}", total=self.iters_per_epoch, completed=done, metrics=""
        )

    def update(self, record: dict[str, Any], advance: int = 1, log_line: bool = False) -> None:
        text = "  ".join(_fmt(k, record[k]) for k in SHOWN if k in record)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=advance, metrics=text)
        elif log_line:
            it = record.get("iteration", "?")
            self.log(f"epoch {record.get('epoch', 0) + 1}/{self.epochs} it {it}  {text}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
