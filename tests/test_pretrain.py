"""End-to-end pretraining on generated images: CLI run, exact resume, non-finite stop, init-from."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dinocli
from dinocli.errors import DinoError, UsageError
from dinocli.train import loop as train_loop
from dinocli.train import resolve_config
from dinocli.train.loop import Trainer, pretrain
from dinocli.distributed import ProcessGroup

TINY = dict(
    arch="vit_tiny", patch_size=8, out_dim=32, global_crop_size=32, local_crop_size=16,
    local_crops_number=2, batch_size=4, warmup_epochs=1, num_workers=0, precision="fp32",
    progress=False, log_every=1, drop_path_rate=0.1, saveckp_freq=1,
)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images" / "nested"
    root.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(root / "gray.jpg")
    return tmp_path / "images"


def config(images, out, **extra):
    return resolve_config(overrides={**TINY, "data": str(images), "output": str(out), **extra})


def teacher_weights(run):
    return torch.load(run / "checkpoint.pth", weights_only=True)["teacher"]


def test_exact_resume_matches_uninterrupted_run(images, tmp_path):
    straight = pretrain(config(images, tmp_path / "a", epochs=2))
    assert (straight.epochs, straight.iterations) == (2, 4)

    cfg = config(images, tmp_path / "b", epochs=2)
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "fp32", display_rich=False)
    try:
        trainer.run(stop_after_epoch=1)  # as if the run had been killed after epoch 1
    finally:
        trainer.close()
    resumed = pretrain(cfg)
    assert (resumed.epochs, resumed.iterations) == (2, 4)

    a, b = teacher_weights(tmp_path / "a"), teacher_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Training really changed the teacher.
    first = torch.load(tmp_path / "b" / "checkpoint0001.pth", weights_only=True)["teacher"]
    assert any(not torch.equal(first[k], b[k]) for k in b)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "summary" not in r] == [1, 2, 3, 4]
    assert all(0 <= r["data_wait"] <= 1 for r in records if "summary" not in r)  # share waiting for data


def test_new_run_replaces_the_metrics_of_an_earlier_run_without_checkpoint(images, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1))
    earlier = (run / "metrics.jsonl").read_text().splitlines()
    for ckpt in run.glob("checkpoint*.pth"):
        ckpt.unlink()  # the user deleted the checkpoints to start over
    pretrain(config(images, run, epochs=1))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(earlier)  # not appended to the earlier run's records
    assert [r["iteration"] for r in records if "summary" not in r] == [1, 2]
    assert "has no checkpoint to resume: this new run replaces the records of the earlier one" in capsys.readouterr().err


def test_checkpoint_contents_and_loading(images, tmp_path):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1))
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher", "optimizer", "strategy", "epoch", "iteration", "config", "rng"):
        assert key in ckpt
    assert ckpt["epoch"] == 1 and ckpt["config"]["arch"] == "vit_tiny"
    assert ckpt["strategy"]["center"].shape == (1, 32)
    assert (run / "config.toml").exists() and (run / "checkpoint0001.pth").exists()
    model = dinocli.load_backbone(run / "checkpoint.pth")
    teacher = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher[key])
    student = dinocli.load_backbone(run / "checkpoint.pth", checkpoint_key="student")
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in model.state_dict().items())


def test_structural_change_on_resume_is_refused(images, tmp_path):
    pretrain(config(images, tmp_path / "run", epochs=1))
    with pytest.raises(UsageError, match="out_dim"):
        pretrain(config(images, tmp_path / "run", epochs=2, out_dim=64))


def last_lr(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "lr" in r][-1]["lr"]


@pytest.mark.parametrize("change", ["data", "batch"])
def test_a_new_epoch_length_goes_on_from_the_epoch_end_on_its_schedules(images, tmp_path, capsys, change):
    run = tmp_path / "run"
    assert pretrain(config(images, run, epochs=1)).iterations == 2  # 9 images, batches of 4
    if change == "data":
        for i in range(4):
            Image.new("RGB", (36, 40), (60 * i, 90, 30)).save(images / "nested" / f"new{i}.png")
        extra, per_epoch, message = {}, 3, "the data changed from 9 to 13 images"
    else:
        extra, per_epoch, message = {"batch_size": 2}, 4, "the global batch changed from 4 to 2"
    resumed = pretrain(config(images, run, epochs=2, **extra))
    assert resumed.iterations == 2 * per_epoch  # the counter the schedules read, at the new epoch length
    assert f"{message}: the schedules continue from the start of the next epoch" in capsys.readouterr().err
    straight = tmp_path / "straight"  # the same images and batch from the start
    pretrain(config(images, straight, epochs=2, **extra))
    assert last_lr(run) == pytest.approx(last_lr(straight))


def test_a_mid_epoch_checkpoint_is_not_resumed_on_other_data(images, tmp_path):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1))
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    ckpt["iteration"] = 3  # one iteration into the second epoch, as Ctrl-C saves it
    torch.save(ckpt, run / "checkpoint.pth")
    Image.new("RGB", (36, 40)).save(images / "nested" / "new.png")
    with pytest.raises(UsageError, match="saved in the middle of an epoch, and the data changed from 9 to 10"):
        pretrain(config(images, run, epochs=2))


def test_mean_patch_token_run_keeps_its_pooling(images, tmp_path):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1, pool="avg"))
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["dinocli.backbone"]["kwargs"]["pool"] == "avg"
    model = dinocli.load_backbone(run / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(dim=1))
    for changed in ({"pool": "cls"}, {"patch_embed": "conv"}):
        with pytest.raises(UsageError, match=next(iter(changed))):
            pretrain(config(images, run, epochs=2, **changed))


def test_shallower_vit_run_keeps_its_depth(images, tmp_path):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1, depth=2))
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["dinocli.backbone"]["kwargs"]["depth"] == 2
    assert {k.split(".")[2] for k in ckpt["teacher"] if k.startswith("backbone.blocks.")} == {"0", "1"}
    model = dinocli.load_backbone(run / "checkpoint.pth")
    assert len(model.blocks) == 2
    with pytest.raises(UsageError, match="depth: 2 -> 3"):
        pretrain(config(images, run, epochs=2, depth=3))
    # a run saved before --depth existed was trained with the architecture's depth (0)
    old = tmp_path / "old"
    pretrain(config(images, old, epochs=1))
    ckpt = torch.load(old / "checkpoint.pth", weights_only=True)
    del ckpt["config"]["depth"]
    torch.save(ckpt, old / "checkpoint.pth")
    with pytest.raises(UsageError, match="depth: 0 -> 2"):
        pretrain(config(images, old, epochs=2, depth=2))
    with pytest.raises(UsageError, match="--depth must not be negative"):
        config(images, tmp_path / "other", depth=-1)


def test_architecture_depth_is_left_out_of_the_backbone_spec(images, tmp_path):
    # depth 0 (the default) builds the architecture's 12 blocks and passes no depth to the factory,
    # so checkpoints of earlier versions and third-party backbones see the kwargs they always saw
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1))
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert "depth" not in ckpt["dinocli.backbone"]["kwargs"]
    assert len(dinocli.load_backbone(run / "checkpoint.pth").blocks) == 12


def test_non_finite_loss_stops_and_keeps_last_checkpoint(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(config(images, run, epochs=1))
    before = (run / "checkpoint.pth").read_bytes()
    real = train_loop.multicrop_cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_loop, "multicrop_cross_entropy", poisoned)
    with pytest.raises(DinoError, match=r"loss became nan at epoch 2, iteration 4"):
        pretrain(config(images, run, epochs=2))
    assert (run / "checkpoint.pth").read_bytes() == before


def test_init_from_starts_a_new_run_with_given_weights(images, tmp_path):
    pretrain(config(images, tmp_path / "first", epochs=1))
    cfg = config(images, tmp_path / "second", epochs=1, init_from=str(tmp_path / "first" / "checkpoint.pth"))
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "fp32", display_rich=False)
    try:
        source = torch.load(tmp_path / "first" / "checkpoint.pth", weights_only=True)["teacher"]
        for key, value in trainer.student.state_dict().items():
            assert torch.equal(value, source[key]), key
        assert trainer.epoch == 0 and not trainer.optimizer.state
    finally:
        trainer.close()


def test_cli_end_to_end(images, tmp_path):
    run = tmp_path / "cli-run"
    args = [sys.executable, "-m", "dinocli", "pretrain", "--data", str(images), "--output", str(run),
            "--epochs", "1", "--no-progress"]
    for key, value in TINY.items():
        if key in ("progress",):
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint:" in proc.stdout
    assert "epoch 1/1 done" in proc.stderr
    again = subprocess.run(args + ["--epochs", "2"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_rerunning_a_finished_run_says_there_is_nothing_to_do(images, tmp_path):
    from typer.testing import CliRunner

    from dinocli.cli import app
    from dinocli.train.config import to_toml

    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(to_toml(config(images, run, epochs=1)))
    first = CliRunner().invoke(app, ["pretrain", "--config", str(toml)])
    assert first.exit_code == 0, first.output
    assert "last epoch loss" in first.stdout and "nan" not in first.stdout
    again = CliRunner().invoke(app, ["pretrain", "--config", str(toml)])
    assert again.exit_code == 0, again.output
    assert "nan" not in again.stdout
    assert f"{run / 'checkpoint.pth'} has already trained 1 epoch(s)" in again.stdout
    assert "nothing to do: raise --epochs to train further" in again.stdout
