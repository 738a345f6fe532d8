"""Distributed pretraining on the CPU with gloo: sharding, per-sample noise, agreement, torchrun runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dinocli.distributed import (
    ProcessGroup,
    agree_on_step,
    global_batch_noise,
    keep_mask,
    read_agreements,
    step_seed,
)
from dinocli.registry import create_backbone
from dinocli.train import resolve_config
from dinocli.train.loop import pretrain
from dinocli.train.sampler import EpochSampler

TINY = dict(
    arch="vit_tiny", patch_size=8, out_dim=32, global_crop_size=32, local_crop_size=16,
    local_crops_number=2, warmup_epochs=1, num_workers=0, precision="fp32", progress=False,
    log_every=1, drop_path_rate=0.1, saveckp_freq=1, device="cpu",
)


def cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    if script.exists():
        return [str(script)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("DINOCLI_DEBUG", None)
    return env


# -- the data order -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, world", [(20, 2, 2), (23, 1, 4), (17, 3, 2)])
def test_processes_see_exactly_the_global_batches_of_one_process(n, batch, world):
    for epoch in (0, 3):
        single = EpochSampler(n, batch * world, seed=5)
        single.set_epoch(epoch)
        shards = [EpochSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
        for s in shards:
            s.set_epoch(epoch)
        whole = list(single)
        parts = [list(s) for s in shards]
        assert all(len(p) == len(s) == single.batches_per_epoch * batch for p, s in zip(parts, shards))
        for b in range(single.batches_per_epoch):
            expected = whole[b * batch * world : (b + 1) * batch * world]
            got = [i for p in parts for i in p[b * batch : (b + 1) * batch]]
            assert got == expected  # process r holds the r-th slice of every global batch
        # each epoch is a fresh permutation of distinct images; the incomplete rest is dropped
        assert len(set(whole)) == len(whole) == (n // (batch * world)) * batch * world
    first, later = EpochSampler(n, batch, seed=5), EpochSampler(n, batch, seed=5)
    later.set_epoch(1)
    assert list(first) != list(later)


def test_sampler_rejects_an_impossible_rank():
    with pytest.raises(ValueError, match="rank < world_size"):
        EpochSampler(10, 2, rank=2, world_size=2)


def test_resuming_mid_epoch_skips_the_batches_already_seen():
    full, resumed = EpochSampler(40, 2, seed=1, rank=1, world_size=2), EpochSampler(40, 2, 1, 1, 2)
    full.set_epoch(2)
    resumed.set_epoch(2, skip_batches=3)
    assert list(resumed) == list(full)[3 * 2 :]
    assert len(resumed) == (10 - 3) * 2


# -- stochastic depth that does not depend on the number of processes --------------------------------


def test_keep_masks_are_the_global_batch_mask_split_by_process():
    views, batch, world, keep = 3, 4, 2, 0.7
    seed = step_seed(0, 11)
    like = torch.zeros(1)
    # One process with the global batch: the mask of a Bernoulli draw of all rows, views first.
    expected = torch.empty(views * batch * world).bernoulli_(keep, generator=torch.Generator().manual_seed(seed))
    with global_batch_noise(seed, batch * world, torch.device("cpu"), ProcessGroup(0, 1)):
        assert torch.equal(keep_mask(views * batch * world, keep, like), expected)
    # Process r keeps the rows of its samples in every view.
    per_view = expected.view(views, world * batch)
    for r in range(world):
        with global_batch_noise(seed, batch, torch.device("cpu"), ProcessGroup(r, world)):
            mine = keep_mask(views * batch, keep, like)
        assert torch.equal(mine, per_view[:, r * batch : (r + 1) * batch].reshape(-1))
    # Another iteration draws other masks; outside the block the global generator is used.
    other = step_seed(0, 12)
    with global_batch_noise(other, batch * world, torch.device("cpu"), ProcessGroup(0, 1)):
        assert not torch.equal(keep_mask(views * batch * world, keep, like), expected)
    torch.manual_seed(3)
    outside = keep_mask(100, keep, like)
    torch.manual_seed(3)
    assert torch.equal(outside, torch.empty(100).bernoulli_(keep))


def test_vit_with_stochastic_depth_gives_each_sample_the_same_output_in_any_shard():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny", patch_size=8, img_size=16, drop_path_rate=0.5).train()
    x = torch.randn(2, 4, 3, 16, 16)  # 2 views x global batch 4
    seed = step_seed(7, 0)
    with torch.no_grad():
        with global_batch_noise(seed, 4, torch.device("cpu"), ProcessGroup(0, 1)):
            whole = vit(x.reshape(8, 3, 16, 16)).view(2, 4, -1)
        for r in range(2):
            with global_batch_noise(seed, 2, torch.device("cpu"), ProcessGroup(r, 2)):
                part = vit(x[:, 2 * r : 2 * r + 2].reshape(4, 3, 16, 16)).view(2, 2, -1)
            torch.testing.assert_close(part, whole[:, 2 * r : 2 * r + 2], atol=1e-5, rtol=1e-5)
        # Stochastic depth really drops branches: another step's masks change the outputs.
        with global_batch_noise(step_seed(7, 1), 4, torch.device("cpu"), ProcessGroup(0, 1)):
            assert not torch.allclose(vit(x.reshape(8, 3, 16, 16)).view(2, 4, -1), whole)


def test_agreement_in_a_single_process_is_the_loss_itself():
    agreed, bad = read_agreements([agree_on_step(torch.tensor(2.5), 4, stop=True),
                                   agree_on_step(torch.tensor(float("inf")), 4)])
    assert (agreed.loss, agreed.finite, agreed.stop) == (2.5, True, True)
    assert not bad.finite and not bad.stop and bad.loss == float("inf")
    assert read_agreements([]) == []


def test_compile_option_compiles_both_backbones_and_keeps_checkpoint_keys(images, tmp_path):
    from dinocli.train.loop import Trainer

    cfg = resolve_config(overrides={**TINY, "data": str(images), "output": str(tmp_path / "run"),
                                    "batch_size": 4, "epochs": 1, "compile": True})
    trainer = Trainer(cfg, ProcessGroup(), torch.device("cpu"), "fp32", display_rich=False)
    try:
        plain_keys = list(create_backbone("vit_tiny", patch_size=8, img_size=32).state_dict())
        state = trainer.state()
        assert state["config"]["compile"] is True
        for net in ("student", "teacher"):
            assert getattr(trainer, net).backbone._compiled_call_impl is not None
            keys = [k[len("backbone."):] for k in state[net] if k.startswith("backbone.")]
            assert keys == plain_keys  # compiled in place: no "_orig_mod." in checkpoints
    finally:
        trainer.close()


# -- two processes with gloo -----------------------------------------------------------------------


def _two_process_worker(rank: int, ports: tuple[int, int], images: str, out: str, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0])
    )
    from dinocli.distributed import (
        all_processes,
        destroy_distributed,
        host_max,
        init_distributed,
        same_on_all_processes,
    )
    from dinocli.errors import DinoError
    from dinocli.train import loop

    torch.set_num_threads(1)
    group, device = init_distributed("cpu")
    record: dict = {"group": [group.rank, group.world_size, group.local_rank]}
    losses, counts = (1.0, 4.0), (3, 1)
    a, b, c = read_agreements([
        agree_on_step(torch.tensor(losses[rank]), counts[rank]),
        agree_on_step(torch.tensor(float("nan") if rank == 1 else 1.0), 2),
        agree_on_step(torch.tensor(1.0), 2, stop=rank == 0),
    ])
    record["mean"] = [a.loss, a.finite, a.stop]
    record["nan_on_one"] = [b.finite, b.stop]
    record["stop_on_one"] = [c.finite, c.stop]
    record["same"] = [same_on_all_processes(7), same_on_all_processes(rank)]
    record["all"] = [all_processes(True), all_processes(rank == 0)]
    # Under NCCL the host's agreements go through a gloo twin of the default group (never the
    # device): the backend is made to read "nccl" so that this CPU test builds and uses the twin.
    import torch.distributed as dist

    from dinocli import distributed

    real_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        twin = distributed._host_group()
        record["twin"] = [twin is not None and twin is not dist.group.WORLD, distributed._host_group() is twin,
                          dist.get_world_size(twin), real_backend(twin)]
        record["twin_all"] = [all_processes(rank == 1), same_on_all_processes(5), host_max([rank, -rank])]
    finally:
        dist.get_backend = real_backend
    destroy_distributed()
    record["twin_dropped"] = distributed._host is None

    # A real training run: process 1 has no images at the first iteration (all skipped), so both
    # processes skip it; at the second, its loss turns non-finite on process 1 only.
    from dinocli.data import multicrop_dataset

    real, calls, batches = loop.multicrop_cross_entropy, {"n": 0}, {"n": 0}
    real_collate = multicrop_dataset.collate_multicrop

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if rank == 1 and calls["n"] == 1 else loss

    def first_batch_lost(batch):
        batches["n"] += 1
        return real_collate([None] * len(batch) if rank == 1 and batches["n"] == 1 else batch)

    os.environ["MASTER_PORT"] = str(ports[1])  # a new store: the first one's addresses are stale
    loop.multicrop_cross_entropy = poisoned
    multicrop_dataset.collate_multicrop = first_batch_lost  # num_workers=0: collated here
    cfg = resolve_config(overrides={**TINY, "data": images, "output": out, "batch_size": 2, "epochs": 1})
    try:
        pretrain(cfg, display_rich=False)
        record["error"] = None
    except DinoError as exc:
        record["error"] = str(exc)
    record["steps"] = calls["n"]
    Path(results, f"{rank}.json").write_text(json.dumps(record))


def test_two_processes_agree_on_loss_stop_and_non_finite_values(images, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "run"
    first = free_port()
    second = next(port for port in iter(free_port, None) if port != first)
    mp.spawn(
        _two_process_worker,
        args=((first, second), str(images), str(out), str(results)),
        nprocs=2,
        join=True,
    )
    records = [json.loads((results / f"{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["group"] == [rank, 2, rank]
        assert record["mean"] == [pytest.approx((1.0 * 3 + 4.0 * 1) / 4), True, False]
        assert record["nan_on_one"] == [False, False]
        assert record["stop_on_one"] == [True, True]
        assert record["same"] == [True, False]
        assert record["all"] == [True, False]
        assert record["twin"] == [True, True, 2, "gloo"] and record["twin_dropped"]
        assert record["twin_all"] == [False, True, [1, 0]]
        # Both processes stop at the same iteration with the same message (no hang).
        assert "loss became nan at epoch 1, iteration 2 on at least one of 2 processes" in record["error"]
        assert record["steps"] == 1  # iteration 1 skipped by both processes (no hang)
    assert not (out / "checkpoint.pth").exists()


def assert_same_state(one: dict, two: dict) -> None:
    """Checkpoints of one process and of several hold the same networks and center."""
    assert (one["epoch"], one["iteration"]) == (two["epoch"], two["iteration"])
    for part in ("teacher", "student"):
        assert one[part].keys() == two[part].keys()
        for key in one[part]:
            torch.testing.assert_close(two[part][key], one[part][key], atol=1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(two["strategy"]["center"], one["strategy"]["center"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_follow_the_single_process_trajectory_and_resume(images, tmp_path):
    # The same two commands (one epoch, then resume to two: the schedules follow --epochs) in one
    # process with a global batch of 4, and in two processes under torchrun with batch 2 each.
    def one_process(epochs: int):
        return pretrain(resolve_config(overrides={
            **TINY, "data": str(images), "output": str(tmp_path / "one"), "batch_size": 4, "epochs": epochs,
        }))

    run = tmp_path / "two"
    args = ["pretrain", "--data", str(images), "--output", str(run), "--batch-size", "2", *cli_args(TINY)]
    assert one_process(1).iterations == 2
    first = subprocess.run(
        [*torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "dinocli", *args, "--epochs", "1"],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("checkpoint:") == 1  # only the first process reports
    assert "2 process(es)" in first.stderr
    after_one = torch.load(run / "checkpoint.pth", weights_only=True)
    assert (after_one["epoch"], after_one["iteration"], after_one["global_batch"]) == (1, 2, 4)
    assert_same_state(torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True), after_one)

    # The resume goes through `dino pretrain --nproc-per-node 2`, which launches torchrun itself.
    assert one_process(2).iterations == 4
    second = subprocess.run(
        [sys.executable, "-m", "dinocli", *args, "--epochs", "2", "--nproc-per-node", "2"],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "epoch 1, iteration 2" in second.stderr
    two = torch.load(run / "checkpoint.pth", weights_only=True)
    assert (two["epoch"], two["iteration"]) == (2, 4)
    assert_same_state(torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True), two)
    # Training moved the teacher, so the comparisons are not trivially true.
    assert any(not torch.allclose(after_one["teacher"][k], two["teacher"][k]) for k in two["teacher"])

    def losses(path: Path) -> dict[int, float]:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["iteration"]: r["loss"] for r in records if "summary" not in r}

    expected, got = losses(tmp_path / "one" / "metrics.jsonl"), losses(run / "metrics.jsonl")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]  # one record per iteration: rank 0 alone writes
    for it in expected:
        assert got[it] == pytest.approx(expected[it], abs=1e-5), it


def test_an_error_on_one_process_stops_every_process(images, tmp_path):
    (images / "7.png").write_bytes(b"not an image")  # read by exactly one of the two processes
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(images), "--output", str(run), "--batch-size", "2",
            "--epochs", "1", "--on-bad-image", "fail", *cli_args(TINY)]
    proc = subprocess.run(
        [*torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "dinocli", *args],
        capture_output=True, text=True, timeout=240, env=child_env(),
    )
    assert proc.returncode != 0
    assert "error: cannot decode image" in proc.stderr and "7.png" in proc.stderr
    assert not (run / "checkpoint.pth").exists()


def test_nproc_per_node_is_refused_inside_torchrun(images, tmp_path, cli, monkeypatch):
    from dinocli.cli import app

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    result = cli.invoke(app, ["pretrain", "--data", str(images), "--output", str(tmp_path / "r"),
                              "--nproc-per-node", "2"])
    assert result.exit_code == 2
    assert "cannot be used under torchrun" in result.output



@pytest.mark.parametrize("problem", ["empty_data", "small_data", "output_file"])
def test_launch_says_an_input_error_once_before_starting_processes(images, tmp_path, cli, monkeypatch, problem):
    from dinocli import distributed
    from dinocli.cli import app

    def never(*_):
        raise AssertionError("processes were started")

    monkeypatch.setattr(distributed, "launch_local_processes", never)
    data, out = images, tmp_path / "run"
    if problem == "empty_data":
        data = tmp_path / "empty"
        data.mkdir()
    elif problem == "output_file":
        out.write_text("a file")
    result = cli.invoke(app, ["pretrain", "--data", str(data), "--output", str(out), "--nproc-per-node", "2",
                              "--batch-size", "8" if problem == "small_data" else "2", *cli_args(TINY)])
    expected = {
        "empty_data": f"error: no images found under {data}",
        "small_data": "error: 8 images are fewer than one global batch of 16 (2 processes x --batch-size 8); "
                      "lower --batch-size",
        "output_file": f"error: --output {out} is a file; give a folder",
    }[problem]
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and expected in result.output, result.output
