"""The ``tensorboard`` logger: scalars in ``RUN/tensorboard/`` (``pip install 'dinocli[tensorboard]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dinocli
from dinocli.loggers import require, scalars


class TensorBoardLogger:
    """Each number of a record as the scalar ``GROUP/KEY`` (``train/loss``, ``knn/knn_top1``) at its iteration."""

    def __init__(self, output: Path, **_: Any) -> None:
        require("tensorboard", "tensorboard")
        self.folder = Path(output) / "tensorboard"
        self._writer = self._open()

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.folder), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        group, step, values = scalars(record)
        for key, value in values.items():
            self._writer.add_scalar(f"{group}/{key}", value, step)
        if group != "train":
            self._writer.flush()

    def rewind(self, iteration: int) -> None:
        """TensorBoard hides events at or past ``purge_step`` written before the restart."""
        self._writer.close()
        self._writer = self._open(purge_step=iteration + 1)

    def close(self) -> None:
        self._writer.close()


@dinocli.hookimpl
def dinocli_register_loggers(register) -> None:
    register("tensorboard", TensorBoardLogger, description="scalars in RUN/tensorboard/ (extra: tensorboard)")
