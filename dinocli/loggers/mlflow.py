"""The ``mlflow`` logger: an MLflow run, in a local store ``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI``
is set (``pip install 'dinocli[mlflow]'``, mlflow-skinny)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import dinocli
from dinocli.io import atomic_write_text
from dinocli.loggers import require, scalars

#: MLflow's longest parameter value.
MAX_PARAM = 6000


class MlflowLogger:
    """One MLflow run per run folder (its id kept in ``RUN/mlflow-run-id``); the config as parameters."""

    def __init__(self, output: Path, run_name: str, config: dict[str, Any], **_: Any) -> None:
        # offline means offline: no usage telemetry unless the user asks for it
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store only on request; a local folder needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(output) / "mlruns").resolve().as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        id_file = Path(output) / "mlflow-run-id"
        self.run_id = self._existing_run(id_file)
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dinocli")
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(config.items())]
            self._client.log_batch(self.run_id, params=[Param(p.key, p.value[:MAX_PARAM]) for p in params])
            atomic_write_text(id_file, self.run_id + "\n")

    def _existing_run(self, id_file: Path) -> str | None:
        if not id_file.is_file():
            return None
        run_id = id_file.read_text().strip()
        try:
            self._client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run deleted from the store: start a new one
            return None
        return run_id

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        group, step, values = scalars(record)
        now = int(time.time() * 1000)
        metrics = [Metric(f"{group}/{key}", value, now, step) for key, value in values.items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


@dinocli.hookimpl
def dinocli_register_loggers(register) -> None:
    register("mlflow", MlflowLogger, description="an MLflow run, local store RUN/mlruns by default (extra: mlflow)")
