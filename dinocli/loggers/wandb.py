"""The ``wandb`` logger: a Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise
(``pip install 'dinocli[wandb]'``; ``wandb sync RUN/wandb/offline-run-*`` uploads it later)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dinocli
from dinocli.io import atomic_write_text
from dinocli.loggers import require, scalars


class WandbLogger:
    """One W&B run per run folder (its id kept in ``RUN/wandb/run-id``, so a resumed run continues it)."""

    def __init__(self, output: Path, run_name: str, config: dict[str, Any], **_: Any) -> None:
        wandb = require("wandb", "wandb")
        folder = Path(output) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode == "offline":  # offline means offline: no crash reports either
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dinocli"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(output),
            config=config,
            mode=mode,
        )

    def log(self, record: dict[str, Any]) -> None:
        group, step, values = scalars(record)
        self._run.log({f"{group}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


@dinocli.hookimpl
def dinocli_register_loggers(register) -> None:
    register("wandb", WandbLogger, description="a Weights & Biases run, offline by default (extra: wandb)")
