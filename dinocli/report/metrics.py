"""Reading ``RUN/metrics.jsonl``: per-iteration records, epoch summaries and k-NN evaluations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dinocli.errors import UsageError


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} not found: is {path.parent} the --output folder of 'dino pretrain'?")
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            if isinstance(record["iteration"], bool) or not isinstance(record["iteration"], (int, float)):
                raise UsageError(f"{path}, line {number}: 'iteration' is {record['iteration']!r}, not a number")
            records.append(record)
    if not records:
        if any(line.strip() for line in lines):
            raise UsageError(f"{path} holds no metrics records (JSON objects with an 'iteration'): is it a dinocli log?")
        raise UsageError(f"{path} holds no metrics yet: train for at least one logged iteration")
    return records


def kind(record: dict[str, Any]) -> str:
    """``iteration``, ``epoch`` (an epoch summary) or ``knn`` (a k-NN evaluation)."""
    return record.get("summary", "iteration")


def series(records: list[dict[str, Any]], key: str, of: str = "iteration") -> tuple[list[float], list[float | None]]:
    """``(iterations, values)`` of ``key`` in the records of kind ``of`` that have it (non-finite: None)."""
    xs, ys = [], []
    for record in records:
        if kind(record) != of or key not in record:
            continue
        value = record[key]
        xs.append(float(record["iteration"]))
        ys.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None)
    return xs, ys


__all__ = ["kind", "load_metrics", "series"]
