"""``dino bench``: the recommendation formula, the JSON keys and their consistency, errors, and the
``--augment-on`` option of pretraining."""

from __future__ import annotations

import json
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch

from dinocli.bench import JSON_KEYS, end_to_end_rate, recommend_workers
from dinocli.cli import app
from dinocli.errors import UsageError
from dinocli.train.config import resolve_config

from conftest import make_rgb_image

TINY = [
    "--arch", "vit_tiny", "--patch-size", "8", "--out-dim", "32", "--global-crop-size", "32",
    "--local-crop-size", "16", "--local-crops-number", "2", "--batch-size", "4", "--images", "8",
    "--steps", "1", "--device", "cpu", "--precision", "fp32",
]  # fmt: skip


@pytest.fixture
def one_thread():
    """One torch thread: the machine running the tests is shared (timings only, not results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(8):
        make_rgb_image(48, 40, seed=i).save(root / f"{i}.jpg")
    return root


@pytest.mark.parametrize(
    "step, per_worker, cpus, expected",
    [(1000.0, 100.0, 64, 11), (1000.0, 100.0, 8, 8), (10.0, 100.0, 8, 1), (250.0, 100.0, 16, 3)],
)
def test_recommended_workers_feed_the_model_with_a_margin(step, per_worker, cpus, expected):
    assert recommend_workers(step, per_worker, cpus) == expected
    assert expected == max(1, min(cpus, math.ceil(1.1 * step / per_worker)))


def test_json_has_exactly_the_issue_keys_and_a_consistent_verdict(cli, images, one_thread):
    result = cli.invoke(app, ["bench", "--data", str(images), "--num-workers", "1", "--json", *TINY])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert tuple(figures) == JSON_KEYS
    for key in JSON_KEYS[:5]:
        assert isinstance(figures[key], float) and figures[key] > 0, key
    slower = min(figures["augment_images_per_s"], figures["step_images_per_s"])
    assert figures["end_to_end_images_per_s"] <= 1.5 * slower  # both stages, one after the other
    data_rate, step_rate = figures["augment_images_per_s"], figures["step_images_per_s"]
    assert figures["bottleneck"] == ("data" if data_rate < step_rate else "model")
    assert figures["recommended_num_workers"] == recommend_workers(
        step_rate, figures["augment_images_per_s_per_worker"]
    )


def test_human_output_with_augmentation_on_the_device(cli, images, one_thread):
    result = cli.invoke(
        app, ["bench", "--data", str(images), "--num-workers", "0", "--augment-on", "gpu", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert "augmentation on gpu" in result.stdout
    assert "bottleneck:" in result.stdout and "recommended: --num-workers" in result.stdout
    assert "end to end (files -> step)" in result.stdout
    assert re.search(r"waiting for data \d+ % of the time", result.stdout)


def test_where_the_workers_limit_the_hint_gives_the_split_rate(cli, images, one_thread, monkeypatch):
    import dinocli.bench

    monkeypatch.setattr(dinocli.bench, "step_rate", lambda trainer, batch, steps: 1e6)  # a model no worker feeds
    result = cli.invoke(app, ["bench", "--data", str(images), "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.output
    assert "bottleneck: data" in result.stdout
    hint = re.search(r"try: --augment-on split .*: (\d+) images/s per worker, --num-workers (\d+) would", result.stdout)
    assert hint and int(hint[1]) > 0 and int(hint[2]) == recommend_workers(1e6, float(hint[1]))
    model_bound = cli.invoke(app, ["bench", "--data", str(images), "--num-workers", "0", "--augment-on", "split", *TINY])
    assert model_bound.exit_code == 0 and "try:" not in model_bound.stdout  # already split


class SleepyViews(torch.utils.data.Dataset):
    """Two 4x4 views per item, each item taking ``seconds`` to load."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __len__(self):
        return 8

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return [torch.full((3, 4, 4), float(i)), torch.zeros(3, 2, 2)]


class SleepyTrainer:
    """What ``end_to_end_rate`` uses of a ``Trainer``; each step takes ``seconds``, its loss the batch's mean."""

    def __init__(self, seconds: float):
        self.seconds, self.pending = seconds, []
        self.device = torch.device("cpu")
        self.schedules = SimpleNamespace(teacher_temp=lambda it: 0.04, momentum=lambda it: 0.996)

    def step(self, crops, temp, momentum, diagnose):
        time.sleep(self.seconds)
        ready, self.pending = self.pending, [float(crops[0].mean())]
        return ready, None

    def settle(self):
        ready, self.pending = self.pending, []
        return ready


@pytest.mark.parametrize("load_s, step_s, waits", [(0.02, 0.0, True), (0.0, 0.08, False)])
def test_end_to_end_says_how_long_the_step_waited_for_data(load_s, step_s, waits):
    """In-process loading (no workers): a slow data set is waited for, a slow step is not."""
    measured = end_to_end_rate(SleepyTrainer(step_s), SleepyViews(load_s), num_workers=0, batch_size=2, steps=3)
    assert measured.losses == [2.5, 4.5, 6.5]  # the timed batches (items 2-7, after the warm-up batch), each once
    assert (measured.data_wait_share > 0.8) if waits else (measured.data_wait_share < 0.2)
    assert measured.images_per_s == pytest.approx(6 / (3 * (2 * load_s + step_s)), rel=0.5)


def test_missing_folder_is_one_line_and_exit_2(cli, tmp_path):
    result = cli.invoke(app, ["bench", "--data", str(tmp_path / "nope"), "--json"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: data folder not found: {tmp_path / 'nope'}"]


def test_an_undecodable_file_is_named_and_left_out_as_training_leaves_it_out(cli, images, one_thread):
    bad = images / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a JPEG after all")
    result = cli.invoke(app, ["bench", "--data", str(images), "--num-workers", "0", *TINY, "--images", "9"])
    assert result.exit_code == 0, result.output
    assert f"1 of the files timed cannot be decoded (training skips them), e.g. {bad}" in result.stdout
    assert re.search(r"decode\s+\d+\.\d images/s", result.stdout)


def test_bad_augment_on_is_a_usage_error(cli, images):
    result = cli.invoke(app, ["bench", "--data", str(images), "--augment-on", "tpu", *TINY])
    assert result.exit_code == 2
    assert "--augment-on" in result.stderr and "tpu" in result.stderr


def test_pretrain_config_validates_augment_on():
    base = {"data": "x", "output": "y"}
    assert resolve_config(overrides=base).augment_on == "cpu"
    assert resolve_config(overrides={**base, "augment_on": "gpu"}).augment_on == "gpu"
    assert resolve_config(overrides={**base, "augment_on": "split"}).augment_on == "split"
    with pytest.raises(UsageError, match="augment-on"):
        resolve_config(overrides={**base, "augment_on": "tpu"})


def test_bench_times_the_run_a_config_file_describes_with_the_options_over_it(cli, images, tmp_path, monkeypatch):
    import dinocli.bench
    from dinocli.train.config import to_toml

    run_config = tmp_path / "config.toml"  # as `dino pretrain` writes it into its run folder
    run_config.write_text(to_toml(resolve_config(overrides={
        "data": str(images), "output": str(tmp_path / "run"), "arch": "vit_tiny", "patch_size": 8, "out_dim": 32,
        "global_crop_size": 32, "local_crop_size": 16, "local_crops_number": 2, "batch_size": 4, "depth": 2,
        "patch_embed": "conv", "device": "cpu", "precision": "fp32", "num_workers": 0,
    })))  # fmt: skip
    timed = {}

    def step_rate(trainer, crops, steps):
        timed.update(blocks=len(trainer.student.backbone.blocks), spec=trainer.spec, crops=[c.shape for c in crops])
        return 100.0

    monkeypatch.setattr(dinocli.bench, "step_rate", step_rate)
    result = cli.invoke(app, ["bench", "--config", str(run_config), "--depth", "3", "--images", "8", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("8 images, vit_tiny/8 on cpu (fp32), batch 4")
    assert timed["blocks"] == 3 and timed["spec"]["kwargs"]["depth"] == 3  # the command line over the file
    assert timed["spec"]["kwargs"]["patch_embed"] == "conv"  # the file over the defaults
    assert timed["crops"] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
