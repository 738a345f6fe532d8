"""Interrupted runs lose at most the current epoch: ``kill -9`` and Ctrl-C of a real ``dino pretrain``
process, a crash between writing a file and renaming it, a failed rename and a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import broken_files as bf
from dinocli.cli import app
from dinocli.errors import DinoError
from dinocli.io import atomic_path, atomic_write_bytes

TINY = ["--arch", "vit_tiny", "--patch-size", "8", "--out-dim", "32", "--global-crop-size", "32",
        "--local-crop-size", "16", "--local-crops-number", "1", "--batch-size", "4", "--warmup-epochs",
        "1", "--precision", "fp32", "--device", "cpu", "--no-progress", "--num-workers", "0",
        "--drop-path-rate", "0.1", "--log-every", "1", "--epochs", "2", "--seed", "3"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the machine's cores are shared, and more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_images(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bf.rgb(40, 36, seed=i).save(root / f"{i}.png")
    return root


def teacher(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pth", weights_only=True)["teacher"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- a crash between write and rename ---------------------------------------------------------------

DIE_ON_RENAME = """
import os, signal, sys
import dinocli.io

def die(src, dst):  # the write is complete and synced; the process dies before the rename
    os.kill(os.getpid(), signal.SIGKILL)

dinocli.io.os.replace = die
dinocli.io.atomic_write_bytes(sys.argv[1], b"new content")
"""


def test_kill_between_write_and_rename_leaves_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pth"
    target.write_bytes(b"previous content")
    proc = subprocess.run([sys.executable, "-c", DIE_ON_RENAME, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_bytes() == b"previous content"
    # what the dead process left: its complete temporary file, under a name nothing reads
    (stale,) = leftovers(tmp_path)
    assert stale.startswith(".checkpoint.pth.") and (tmp_path / stale).read_bytes() == b"new content"
    atomic_write_bytes(target, b"next content")  # the next write is not disturbed by it
    assert target.read_bytes() == b"next content"


@pytest.mark.parametrize(
    ("fail", "error", "message"),
    [
        ("rename", DinoError, "could not write {target} (Input/output error); it was not changed"),
        ("fsync", DinoError, "could not write {target} (Input/output error); it was not changed"),
        ("enospc", DinoError, "no space left on device while writing {target}; it was not changed"),
        ("interrupt", KeyboardInterrupt, ""),
        ("body", ValueError, "serialisation failed"),
    ],
)
def test_failures_while_writing_leave_the_previous_file(tmp_path, monkeypatch, fail, error, message):
    import dinocli.io as io_module

    target = tmp_path / "out.bin"
    target.write_bytes(b"previous content")

    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if fail == "rename":
        monkeypatch.setattr(io_module.os, "replace", broken)
    elif fail == "fsync":
        monkeypatch.setattr(io_module.os, "fsync", broken)
    with pytest.raises(error) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            if fail == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if fail == "interrupt":
                raise KeyboardInterrupt
            if fail == "body":
                raise ValueError("serialisation failed")
    assert str(info.value) == message.format(target=target)
    assert target.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == []


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(DinoError, match=r"^cannot write .*not_a_folder/out\.bin: "):
        atomic_write_bytes(blocker / "out.bin", b"data")


# -- one run per folder; what a resume may change ----------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_finished_run_frees_it(tmp_path, cli):
    from dinocli.io import FolderLock

    data, run = make_images(tmp_path / "images" / "cls", 8).parent, tmp_path / "run"
    run.mkdir()
    held = FolderLock(run, "dino pretrain")  # as a run still going would hold it (flock: per open file)
    result = cli.invoke(app, ["pretrain", "--data", str(data), "--output", str(run), *TINY, "--epochs", "1"])
    line = bf.error_line(2, result.exit_code, result.stderr, result.stdout)
    assert line == f"error: {run} is in use by another dino pretrain (pid {os.getpid()}); wait for it to end or give another folder"
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing read or written
    held.release()
    result = cli.invoke(app, ["pretrain", "--data", str(data), "--output", str(run), *TINY, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", "config.toml", "metrics.jsonl"]  # lock gone


def test_resume_refuses_a_new_init_from_says_how_to_keep_a_setting_and_a_finished_run_keeps_its_config(tmp_path, cli):
    data, run = make_images(tmp_path / "images" / "cls", 8).parent, tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--output", str(run), *TINY, "--epochs", "1"]
    assert cli.invoke(app, args).exit_code == 0
    config = (run / "config.toml").read_text()
    result = cli.invoke(app, [*args, "--init-from", str(run / "checkpoint.pth")])
    line = bf.error_line(2, result.exit_code, result.stderr, result.stdout)
    assert line == (f"error: {run} already holds a run ({run / 'checkpoint.pth'}); --init-from starts a new one: "
                    "give another --output, or drop --init-from to resume this run")  # fmt: skip
    result = cli.invoke(app, [*args, "--out-dim", "64"])
    line = bf.error_line(2, result.exit_code, result.stderr, result.stdout)
    assert "(out_dim: 32 -> 64); give --out-dim 32 to go on with it, use another --output" in line
    result = cli.invoke(app, [*args, "--seed", "5"])  # finished: nothing to do
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert (run / "config.toml").read_text() == config  # still the settings it was trained with
    # a run started with --init-from resumes with the same command
    second = tmp_path / "second"
    again = ["pretrain", "--data", str(data), "--output", str(second), *TINY, "--init-from", str(run / "checkpoint.pth")]
    assert cli.invoke(app, [*again, "--epochs", "1"]).exit_code == 0
    result = cli.invoke(app, [*again, "--epochs", "2"])
    assert result.exit_code == 0 and "resuming from" in result.output, result.output


# -- training checkpoints: failed rename, full disk ---------------------------------------------------


def test_failed_rename_and_full_disk_keep_the_last_checkpoint_and_the_run_resumes(tmp_path, cli, monkeypatch):
    import dinocli.io as io_module

    data = make_images(tmp_path / "images", 8)
    straight = tmp_path / "straight"
    assert cli.invoke(app, ["pretrain", "--data", str(data), "--output", str(straight), *TINY]).exit_code == 0
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--output", str(run), *TINY]
    checkpoint = run / "checkpoint.pth"
    real_replace = os.replace
    renames: list[bytes] = []  # what checkpoint.pth held before each rename over it

    def second_checkpoint_rename_fails(src, dst):
        if Path(dst).name == "checkpoint.pth":
            renames.append(Path(dst).read_bytes() if Path(dst).exists() else b"")
            if len(renames) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    with monkeypatch.context() as m:  # epoch 1 is saved, the save of epoch 2 fails at the rename
        m.setattr(io_module.os, "replace", second_checkpoint_rename_fails)
        result = cli.invoke(app, args)
    line = bf.error_line(1, result.exit_code, result.stderr, result.stdout)
    assert line == f"error: could not write {checkpoint} (Input/output error); it was not changed"
    saved = renames[1]  # the checkpoint of epoch 1
    assert checkpoint.read_bytes() == saved and leftovers(run) == []
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    real_save = torch.save

    def disk_fills_up(obj, f, *a, **kw):  # half the bytes reach the disk, then ENOSPC
        Path(f).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_fills_up)
        result = cli.invoke(app, args)
    line = bf.error_line(1, result.exit_code, result.stderr, result.stdout)
    assert line == f"error: no space left on device while writing {checkpoint}; it was not changed"
    assert checkpoint.read_bytes() == saved and leftovers(run) == []
    assert torch.save is real_save

    # nothing was lost: the same command goes on from epoch 1 and ends where a straight run does
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr and "epoch 1, iteration 2" in result.stderr
    assert_same_weights(teacher(run), teacher(straight))


def test_full_disk_while_writing_features_keeps_the_previous_file(tmp_path, cli, monkeypatch):
    import dinocli.evaluate.features_io as features_io

    data = make_images(tmp_path / "images" / "cls", 4).parent
    out = tmp_path / "features.safetensors"
    previous = bf.previous_features(out)

    def disk_fills_up(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features_io, "save_file", disk_fills_up)
    result = cli.invoke(app, ["extract", "--data", str(data), "--output", str(out), "--random-init", "--arch",
                              "vit_tiny", "--patch-size", "8", "--resize", "32", "--crop-size", "32",
                              "--num-workers", "0"])
    line = bf.error_line(1, result.exit_code, result.stderr, result.stdout)
    assert line == f"error: no space left on device while writing {out}; it was not changed"
    assert out.read_bytes() == previous and leftovers(tmp_path) == []


# -- real processes: kill -9 and Ctrl-C -------------------------------------------------------------


def dino_pretrain(data: Path, run: Path) -> list[str]:
    script = Path(sys.executable).with_name("dino")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dinocli"]
    return [*command, "pretrain", "--data", str(data), "--output", str(run), *TINY]


def quiet_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DINOCLI_DEBUG", None)
    return env


def wait_for_iteration(proc: subprocess.Popen, run: Path, iteration: int, timeout: float = 300) -> None:
    """Poll ``metrics.jsonl`` until the process has logged ``iteration`` (1-based)."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                if "summary" not in record and record.get("iteration", 0) >= iteration:
                    return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"iteration {iteration} never came")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """12 images, one of them unreadable (skipped), batches of 4: 3 iterations per epoch, 2 epochs, run
    straight through in a process."""
    root = tmp_path_factory.mktemp("straight")
    data = make_images(root / "images", 12)
    bf.not_an_image(data / "6.png")  # image 8 in find_images order: the first one of the first batch (seed 3)
    run = root / "run"
    proc = subprocess.run(dino_pretrain(data, run), capture_output=True, text=True, env=quiet_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return data, teacher(run), records_of(run)


def records_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_then_the_same_command_finishes_as_if_never_killed(uninterrupted, tmp_path):
    data, reference, _ = uninterrupted
    run = tmp_path / "run"
    proc = subprocess.Popen(dino_pretrain(data, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=quiet_env())
    try:
        wait_for_iteration(proc, run, 4)  # the first iteration of epoch 2 is done: kill mid-epoch
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    assert saved["iteration"] == 3 * saved["epoch"] and saved["epoch"] >= 1  # at most the epoch is lost

    again = subprocess.run(dino_pretrain(data, run), capture_output=True, text=True, env=quiet_env(), timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run / 'checkpoint.pth'}: epoch {saved['epoch']}" in again.stderr
    assert_same_weights(teacher(run), reference)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "summary" not in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_the_last_iteration_exits_130_and_resume_accepts_it(uninterrupted, tmp_path, stop):
    data, reference, straight = uninterrupted
    run = tmp_path / "run"
    proc = subprocess.Popen(dino_pretrain(data, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=quiet_env())
    try:
        wait_for_iteration(proc, run, 1)  # mid-epoch 1
        proc.send_signal(stop)  # SIGTERM: what a scheduler (SLURM, Kubernetes, torchrun) sends first
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = bf.error_line(130, proc.returncode, stderr, stdout)
    assert line == "error: interrupted"
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 0 and 1 <= saved["iteration"] <= 3  # mid-epoch: the last completed iteration
    assert (f"interrupted: saved iteration {saved['iteration']} to {run / 'checkpoint.pth'}; "
            "run the same command to continue") in stderr

    again = subprocess.run(dino_pretrain(data, run), capture_output=True, text=True, env=quiet_env(), timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run / 'checkpoint.pth'}: epoch 0, iteration {saved['iteration']}" in again.stderr
    assert_same_weights(teacher(run), reference)
    records = records_of(run)
    assert [r["iteration"] for r in records if "summary" not in r] == [1, 2, 3, 4, 5, 6]  # the saved one too
    summaries = [r for r in records if r.get("summary") == "epoch"]
    expected = [r for r in straight if r.get("summary") == "epoch"]
    assert [r["iteration"] for r in summaries] == [r["iteration"] for r in expected] == [3, 6]
    # the resumed epoch's mean loss covers the whole epoch, not only its resumed part
    assert [r["loss"] for r in summaries] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    assert [r["skipped_images"] for r in summaries] == [r["skipped_images"] for r in expected] == [1, 1]
