"""Configuration: defaults < file < command line, type checks, impossible values, round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dinocli.errors import UsageError
from dinocli.train.config import PretrainConfig, load_toml, resolve_config, to_toml

BASE = {"data": "imgs", "output": "run"}


def test_defaults_are_the_reference_ones():
    cfg = resolve_config(overrides=BASE)
    assert (cfg.arch, cfg.patch_size, cfg.out_dim, cfg.momentum_teacher) == ("vit_small", 16, 65536, 0.996)
    assert (cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (cfg.weight_decay, cfg.weight_decay_end, cfg.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.batch_size, cfg.epochs, cfg.freeze_last_layer, cfg.lr) == (64, 100, 1, 0.0005)
    assert (cfg.warmup_epochs, cfg.min_lr, cfg.optimizer, cfg.drop_path_rate) == (10, 1e-6, "adamw", 0.1)
    assert cfg.global_crops_scale == (0.4, 1.0) and cfg.local_crops_scale == (0.05, 0.4)
    assert (cfg.local_crops_number, cfg.saveckp_freq, cfg.seed) == (8, 20, 0)
    assert cfg.norm_last_layer is True and cfg.use_bn_in_head is False


def test_precedence_defaults_file_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.001\nepochs = 7\nwarmup_epochs = 2\nlocal-crops-scale = [0.1, 0.3]\ndata = "x"\noutput = "o"\n')
    cfg = resolve_config(path, {"epochs": 3})
    assert cfg.lr == 0.001  # from the file
    assert cfg.epochs == 3  # the command line wins
    assert cfg.local_crops_scale == (0.1, 0.3)
    assert cfg.batch_size == 64  # default


def test_round_trip_through_toml(tmp_path):
    cfg = resolve_config(overrides={**BASE, "global_crops_scale": (0.3, 0.9), "collapse": "centering"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert resolve_config(path) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr = 0.1", "Did you mean 'lr'"),
        ("lr = 'fast'", "'lr' in"),
        ("epochs = 1.5", "must be an integer"),
        ("norm_last_layer = 1", "true or false"),
        ("global_crops_scale = [0.4]", "list of 2 numbers"),
        ("lr = ", "not valid TOML"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError, match=message):
        load_toml(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"epochs": 5, "warmup_epochs": 10}, "longer than the run"),
        ({"global_crops_scale": (0.5, 1.5)}, "0 < min <= max <= 1"),
        ({"local_crops_scale": (0.4, 0.1)}, "0 < min <= max <= 1"),
        ({"optimizer": "adam"}, "Did you mean 'adamw'"),
        ({"momentum_teacher": 1.5}, "between 0 and 1"),
        ({"data": ""}, "no data"),
    ],
)
def test_impossible_values_are_rejected(overrides, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(overrides={**BASE, **overrides})


def test_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("warmup_epochz = 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dinocli", "pretrain", "--config", str(path), "--data", str(tmp_path),
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "warmup_epochs" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert isinstance(PretrainConfig(), PretrainConfig)
