"""The built-in ``jsonl`` logger: one JSON object per record in ``RUN/metrics.jsonl`` (``dino report`` reads it)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import dinocli
from dinocli.io import atomic_write_text


class JsonlLogger:
    """Appends each record, with its ``time``, to ``RUN/metrics.jsonl`` (non-finite numbers as ``null``)."""

    def __init__(self, output: Path, **_: Any) -> None:
        self.path = Path(output) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()

    def rewind(self, iteration: int) -> None:
        """Drop records past ``iteration`` (left by a run that stopped after its last checkpoint)."""
        self._file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


@dinocli.hookimpl
def dinocli_register_loggers(register) -> None:
    register("jsonl", JsonlLogger, description="RUN/metrics.jsonl, one JSON object per record (built in)")
