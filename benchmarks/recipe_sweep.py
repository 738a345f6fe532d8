"""Many recipe variants side by side on one GPU, each for the epochs a CPU budget buys.

    python benchmarks/recipe_sweep.py PLAN.json [--data ../shared/datasets/cifar10_sub]
        [--parallel 10] [--seconds 560] [--launch-until 410] [--device cuda] [--output runs/sweep]

A CPU budget of 40 minutes buys only one run of ~12-20 epochs on 2 cores, and two seeds of one
configuration differ by about 2 points of k-NN top-1 on cifar10_sub: one CPU run per variant cannot
tell variants apart. A GPU trains the same epochs in a few minutes, so this script trains the
variants of a plan concurrently (one process each, ``--parallel`` at a time) with the epochs the
plan gives each (what the CPU budget buys it: ``benchmarks/small_data.py`` measures that), then
measures the teacher's k-NN top-1 (k=20, val against train) as ``small_data.py`` does: the whole
images at 32 and 40 px and the reference's 37/32 centre crop (``--eval-size`` there). The k-NN
during training (every quarter of the run, on the 37/32 crop) is printed as a curve.

The plan is JSON::

    {"recipe": "small-data",
     "runs": [{"name": "6 blocks", "epochs": 21, "set": {"depth": 6}, "seed": 0},
              {"name": "random init, 6 blocks", "random_init": {"depth": 6}}]}

``set`` holds any ``dino pretrain`` options (over the recipe); ``random_init`` measures the
recipe's network, with those options, at random initialisation. Runs start in the plan's order
until ``--launch-until`` seconds have passed; any still training at ``--seconds`` are stopped and
reported as such, so the script ends on time on a rented machine. Prints one line of JSON per run
as it ends, then a table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import knn_top1, view_label  # noqa: E402  (the same k-NN as the CPU benchmark)

VIEWS = [(32, 32), (40, 40), (37, 32)]


def train_one(run: dict, plan: dict, args: argparse.Namespace) -> dict:
    """Train (or build at random initialisation) one run of the plan; its figures."""
    import dinocli
    from dinocli.evaluate import backbone_for_eval
    from dinocli.train import pretrain, resolve_config

    folder = args.output / run["name"].replace(" ", "_").replace("/", "_")
    options = {"recipe": plan.get("recipe", "small-data"), "data": str(args.data / "train"),
               "output": str(folder), "progress": False, "saveckp_freq": 0, "device": args.device,
               "num_workers": args.workers, "augment_on": "gpu" if args.device.startswith("cuda") else "cpu",
               "epochs": run.get("epochs", 10), "seed": run.get("seed", 0),
               **run.get("set", {}), **run.get("random_init", {})}
    if "random_init" in run:
        cfg = resolve_config(overrides=options)
        model, _ = backbone_for_eval(random_init=True, arch=cfg.arch, patch_size=cfg.patch_size,
                                     img_size=cfg.global_crop_size, patch_embed=cfg.patch_embed, pool=cfg.pool,
                                     depth=cfg.depth or None, seed=cfg.seed)
        return {"name": run["name"], **{view_label(v): knn_top1(model.to(args.device), args.data, v) for v in VIEWS}}
    every = max(1, options["epochs"] // 4)
    cfg = resolve_config(overrides={**options, "knn_every": every, "knn_train": str(args.data / "train"),
                                    "knn_val": str(args.data / "val")})
    start = time.perf_counter()
    history = pretrain(cfg).history
    seconds = time.perf_counter() - start
    teacher = dinocli.load_backbone(folder / "checkpoint.pth").to(args.device)
    return {"name": run["name"], "epochs": cfg.epochs, "seconds": round(seconds),
            **{view_label(v): knn_top1(teacher, args.data, v) for v in VIEWS},
            "curve": [round(r["knn_top1"], 1) for r in history if r.get("summary") == "knn"]}


def run_plan(plan: dict, args: argparse.Namespace) -> list[dict]:
    """Every run in its own process, ``--parallel`` at a time, within the time limits."""
    start, queue, running, results = time.monotonic(), list(enumerate(plan["runs"])), {}, []
    args.output.mkdir(parents=True, exist_ok=True)
    while queue or running:
        elapsed = time.monotonic() - start
        while queue and len(running) < args.parallel and elapsed < args.launch_until:
            index, run = queue.pop(0)
            log = open(args.output / f"run-{index}.log", "w")
            command = [sys.executable, __file__, str(args.plan), "--one", str(index)] + forwarded(args)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            running[index] = (run, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        if elapsed >= args.launch_until:
            queue.clear()
        for index, (run, proc, log) in list(running.items()):
            if proc.poll() is None and elapsed < args.seconds:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            lines = (args.output / f"run-{index}.log").read_text().splitlines()
            found = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
            result = found[0] if found else {"name": run["name"], "failed": (lines or ["no output"])[-1][-200:]}
            results.append(result)
            print(json.dumps(result), flush=True)
            del running[index]
        time.sleep(1)
    return results


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--data", str(args.data), "--device", args.device, "--output", str(args.output),
            "--workers", str(args.workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10_sub")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=560.0, help="stop every run still training then")
    parser.add_argument("--launch-until", type=float, default=410.0, help="start no run after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes per run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: train run N of the plan
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"data set not found: {args.data} (see ../shared/datasets/README.md)")
    try:
        plan = json.loads(args.plan.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read the plan {args.plan}: {exc}") from None
    if args.one is not None:
        print("RESULT " + json.dumps(train_one(plan["runs"][args.one], plan, args)), flush=True)
        return
    results = run_plan(plan, args)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(f"\nmachine: {device or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"plan {args.plan}, {args.parallel} runs at a time; teacher k-NN top-1 (k=20) at "
          + ", ".join(view_label(v) for v in VIEWS) + " px (PX: the whole image; RESIZE/CROP: a centre crop)")
    labels = [view_label(v) for v in VIEWS]
    print(f"{'run':<28}{'epochs':>7}" + "".join(f"{'@' + label:>9}" for label in labels) + "  curve (37/32)")
    order = {run["name"]: i for i, run in enumerate(plan["runs"])}
    for result in sorted(results, key=lambda r: order.get(r["name"], len(order))):
        if "failed" in result:
            print(f"{result['name']:<28}  not finished: {result['failed']}")
            continue
        print(f"{result['name']:<28}{result.get('epochs', ''):>7}"
              + "".join(f"{result[label]:>8.1f}%" for label in labels)
              + "  " + " ".join(f"{x:.1f}" for x in result.get("curve", [])))


if __name__ == "__main__":
    main()
