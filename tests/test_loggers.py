"""Loggers (metrics sinks): jsonl, tensorboard, wandb and mlflow read back with their own libraries."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dinocli
from conftest import make_rgb_image
from dinocli.cli import app
from dinocli.errors import UsageError
from dinocli.loggers import Loggers, open_loggers, parse_logger_names, scalars
from dinocli.registry import PluginInfo, get_registry
from dinocli.train import resolve_config
from dinocli.train.loop import pretrain

TINY = dict(
    arch="vit_tiny", patch_size=8, depth=1, out_dim=32, global_crop_size=32, local_crop_size=16,
    local_crops_number=2, batch_size=4, warmup_epochs=1, num_workers=0, precision="fp32",
    progress=False, log_every=1, saveckp_freq=1,
)
RECORDS = [
    {"epoch": 0, "iteration": 1, "loss": 3.5, "lr": 0.1},
    {"epoch": 0, "iteration": 2, "loss": 3.25, "lr": 0.2, "collapse_warning": "entropy"},
    {"epoch": 0, "iteration": 2, "loss": 3.375, "summary": "epoch", "skipped_images": 0},
    {"epoch": 0, "iteration": 2, "knn_top1": 42.5, "summary": "knn"},
]


@pytest.fixture(autouse=True)
def no_phoning_home(monkeypatch):
    """W&B and MLflow stay offline: no runs, crash reports or telemetry leave the machine."""
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_ERROR_REPORTING", "false"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        monkeypatch.setenv(key, value)


@pytest.fixture()
def images(tmp_path):
    """Eight small RGB images: two iterations of batch 4."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        make_rgb_image(40, 36, seed=i).save(root / f"{i}.png")
    return root


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def log_all(names: str, run: Path, records=RECORDS) -> list[str]:
    warnings: list[str] = []
    loggers = open_loggers(names, run, {"lr": 0.1, "arch": "vit_tiny"}, warn=warnings.append)
    for record in records:
        loggers.write(record)
    loggers.close()
    return warnings


def test_scalars_keep_numbers_and_group_them():
    assert scalars(RECORDS[1]) == ("train", 2, {"epoch": 0.0, "loss": 3.25, "lr": 0.2})
    assert scalars({"iteration": 5, "summary": "knn", "knn_top1": float("nan"), "ok": True}) == ("knn", 5, {})
    assert parse_logger_names(" jsonl, tensorboard ,jsonl") == ["jsonl", "tensorboard"]
    with pytest.raises(UsageError):
        parse_logger_names(" , ")


def test_builtin_loggers_are_plugins_that_dino_plugins_lists(cli):
    assert {"jsonl", "tensorboard", "wandb", "mlflow"} <= set(dinocli.list_loggers())
    assert get_registry().plugins["jsonl"].builtin
    result = cli.invoke(app, ["plugins", "--json"])
    listed = {name for row in json.loads(result.stdout)["plugins"] for name in row["loggers"]}
    assert result.exit_code == 0 and {"jsonl", "tensorboard", "wandb", "mlflow"} <= listed


def test_pretrain_writes_tensorboard_events_that_tensorboard_reads_back(images, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'dinocli[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = resolve_config(overrides={**TINY, "data": str(images), "output": str(run), "epochs": 1,
                                    "logger": "jsonl,tensorboard"})
    pretrain(cfg)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(r["iteration"], r["loss"]) for r in jsonl(run) if "summary" not in r]
    assert len(logged) == 2  # 8 images, batch 4, log every iteration
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(step, pytest.approx(value, rel=1e-6)) for step, value in logged]
    (summary,) = [r for r in jsonl(run) if r.get("summary") == "epoch"]
    assert [e.value for e in events.Scalars("epoch/loss")] == [pytest.approx(summary["loss"], rel=1e-6)]


def test_resume_rewinds_the_jsonl_log(tmp_path):
    log_all("jsonl", tmp_path)
    loggers = open_loggers("jsonl", tmp_path, {}, warn=print)
    loggers.rewind(1)
    loggers.write({"epoch": 0, "iteration": 2, "loss": 1.0})
    loggers.close()
    assert [(r["iteration"], r["loss"]) for r in jsonl(tmp_path)] == [(1, 3.5), (2, 1.0)]


def test_mlflow_local_store_holds_metrics_and_parameters(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="pip install 'dinocli[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert log_all("mlflow", tmp_path) == []
    run_id = (tmp_path / "mlflow-run-id").read_text().strip()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.5), (2, 3.25)]
    assert [m.value for m in client.get_metric_history(run_id, "knn/knn_top1")] == [42.5]
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "arch": "vit_tiny"} and run.info.status == "FINISHED"
    log_all("mlflow", tmp_path, [{"epoch": 1, "iteration": 3, "loss": 3.0}])  # a resumed run continues it
    assert (tmp_path / "mlflow-run-id").read_text().strip() == run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]


def test_wandb_offline_run_is_written_under_the_run_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'dinocli[wandb]'")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert log_all("wandb", tmp_path) == []
    wandb.teardown()  # W&B's service process writes asynchronously: wait until it has finished
    run_id = (tmp_path / "wandb" / "run-id").read_text().strip()
    (folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    history = (folder / f"run-{run_id}.wandb").read_bytes()  # W&B's binary log of the run
    for key in (b"train/loss", b"knn/knn_top1", b"epoch/skipped_images", b"42.5", b"3.25"):
        assert key in history


def test_a_failing_logger_is_reported_once_and_training_goes_on(images, tmp_path, fresh_registry, capsys):
    class Broken:
        def __init__(self, **kwargs):
            self.calls = 0

        def log(self, record):
            raise OSError("disk full")

        def close(self):
            raise AssertionError("a dropped logger is not closed")

    @dinocli.hookimpl
    def dinocli_register_loggers(register):
        register("broken", Broken)

    registry = get_registry()
    registry.add_plugin(SimpleNamespace(dinocli_register_loggers=dinocli_register_loggers),
                        PluginInfo("broken-plugin", "test", "0", builtin=False))
    run = tmp_path / "run"
    cfg = resolve_config(overrides={**TINY, "data": str(images), "output": str(run), "epochs": 1,
                                    "logger": "broken,jsonl"})
    pretrain(cfg)
    assert (run / "checkpoint.pth").exists() and len(jsonl(run)) == 3  # 2 iterations + the epoch summary
    out = capsys.readouterr()
    reports = [line for line in (out.out + out.err).splitlines() if "logger 'broken' failed" in line]
    assert len(reports) == 1 and "OSError: disk full" in reports[0]


def test_only_the_main_process_creates_loggers(tmp_path):
    loggers = open_loggers("jsonl", tmp_path, {}, warn=print, enabled=False)
    loggers.write(RECORDS[0])
    loggers.close()
    assert list(tmp_path.iterdir()) == []


def test_a_fan_out_drops_only_the_logger_that_fails():
    seen, warnings = [], []
    good = SimpleNamespace(log=seen.append, close=lambda: None)
    bad = SimpleNamespace(log=lambda record: 1 / 0, close=lambda: None)
    loggers = Loggers({"bad": bad, "good": good}, warn=warnings.append)
    for record in RECORDS:
        loggers.write(record)
    assert seen == RECORDS and len(warnings) == 1 and "ZeroDivisionError" in warnings[0]


def test_bad_logger_names_and_missing_libraries_are_one_line_errors(images, tmp_path, cli, monkeypatch):
    args = ["pretrain", "--data", str(images), "--output", str(tmp_path / "run"), "--epochs", "1",
            "--warmup-epochs", "0", "--arch", "vit_tiny", "--depth", "1", "--out-dim", "32",
            "--batch-size", "4", "--global-crop-size", "32", "--local-crop-size", "16", "--num-workers", "0",
            "--precision", "fp32", "--patch-size", "8"]
    result = cli.invoke(app, [*args, "--logger", "jsonl,tensorbord"])
    assert result.exit_code == 2 and "tensorboard" in result.stderr  # the closest name is suggested
    assert len(result.stderr.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if absent
    result = cli.invoke(app, [*args, "--logger", "tensorboard"])
    assert result.exit_code == 2 and "pip install 'dinocli[tensorboard]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_resumed_run_replaces_tensorboard_steps_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'dinocli[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_all("tensorboard", tmp_path, [{"iteration": i, "loss": float(i)} for i in (1, 2, 3)])
    loggers = open_loggers("tensorboard", tmp_path, {}, warn=print)
    loggers.rewind(1)  # resumed from the checkpoint at iteration 1: steps 2 and 3 are logged again
    for i in (2, 3):
        loggers.write({"iteration": i, "loss": 10.0 * i})
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_loggers_already_started_are_closed_when_a_later_one_cannot_start(tmp_path, fresh_registry, monkeypatch):
    closed = []

    class Tracker:
        def __init__(self, **kwargs):
            pass

        def log(self, record):
            pass

        def close(self):
            closed.append(True)

    @dinocli.hookimpl
    def dinocli_register_loggers(register):
        register("tracker", Tracker)

    get_registry().add_plugin(SimpleNamespace(dinocli_register_loggers=dinocli_register_loggers),
                              PluginInfo("tracker-plugin", "test", "0", builtin=False))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if absent
    with pytest.raises(UsageError, match="dinocli\\[tensorboard\\]"):
        open_loggers("tracker,tensorboard", tmp_path, {}, warn=print)
    assert closed == [True]


def test_a_logger_without_log_or_close_is_named_when_the_run_starts(tmp_path, fresh_registry):
    class NoClose:
        def __init__(self, **kwargs):
            pass

        def log(self, record):
            pass

    @dinocli.hookimpl
    def dinocli_register_loggers(register):
        register("no-close", NoClose)
        register("nothing", lambda **kwargs: object())

    get_registry().add_plugin(SimpleNamespace(dinocli_register_loggers=dinocli_register_loggers),
                              PluginInfo("half-plugin", "test", "0", builtin=False))
    warnings: list[str] = []
    loggers = open_loggers("no-close,nothing,jsonl", tmp_path, {}, warn=warnings.append)
    assert list(loggers.loggers) == ["jsonl"]
    assert warnings == [
        "warning: logger 'no-close' from plugin 'half-plugin' is broken: it has no close() method; "
        "training goes on without it",
        "warning: logger 'nothing' from plugin 'half-plugin' is broken: it has no log() and no close() method; "
        "training goes on without it",
    ]
    loggers.close()
