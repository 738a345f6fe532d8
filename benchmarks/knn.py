"""Benchmark: dinocli's k-NN (FAISS, one search for every k) against the reference's algorithm.

The reference (facebookresearch/dino ``eval_knn.py``) runs, for each k separately, a chunked
``torch.mm`` of val against all train features, ``topk``, and a one-hot vote over every class.
Both run here in the same process on generated clustered features; the script prints time, peak
memory (resident set growth, Linux) and the accuracies, which must be identical for exact search.

    python benchmarks/knn.py                      # 100k train x 10k val x 384-d, k = 10 20 100 200
    python benchmarks/knn.py --num-train 20000 --num-val 2000   # a quicker run
    python benchmarks/knn.py --threads 1           # both sides on one core (a machine others load)

dinocli's times include everything ``knn_classify`` does: normalising, building (training) the index,
calibrating ``--index ivf`` and measuring its recall on a sample against exact search, the votes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dinocli.evaluate.knn import IndexSpec, knn_classify


def clustered_features(
    n_train: int, n_val: int, dim: int, classes: int, spread: float, latent: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and val features of ``classes`` overlapping Gaussian clusters.

    Like real embeddings they have a low intrinsic dimension: unit-variance clusters whose centers
    are ``spread`` apart (per coordinate) in a ``latent``-dimensional space, mapped linearly to
    ``dim`` dimensions, plus a little isotropic noise.
    """
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(classes, latent, generator=g)
    projection = torch.randn(latent, dim, generator=g) / latent**0.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=g)
        z = centers[labels] + torch.randn(n, latent, generator=g)
        return z @ projection + 0.1 * torch.randn(n, dim, generator=g), labels

    return (*draw(n_train), *draw(n_val))


@torch.no_grad()
def reference_knn(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
    k: int, T: float, num_classes: int, num_chunks: int = 100,
) -> tuple[float, float]:
    """The reference algorithm for one k on L2-normalised features: chunked mm + topk, one-hot
    votes, sort (written anew; the sort is stable so that ties rank as in dinocli)."""
    train = train.t()
    n = test_labels.shape[0]
    step = max(1, n // num_chunks)
    top1 = top5 = 0
    one_hot = torch.zeros(k, num_classes)
    for start in range(0, n, step):
        feats, targets = test[start : start + step], test_labels[start : start + step]
        b = targets.shape[0]
        sims, idx = torch.mm(feats, train).topk(k, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
        one_hot.resize_(b * k, num_classes).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = sims.clone().div_(T).exp_()
        probs = (one_hot.view(b, -1, num_classes) * weights.view(b, -1, 1)).sum(1)
        predictions = probs.sort(dim=1, descending=True, stable=True).indices
        correct = predictions.eq(targets.view(-1, 1))
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, : min(5, k)].sum())
    return 100.0 * top1 / n, 100.0 * top5 / n


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """``fn()``, its wall time in seconds and its peak resident-memory growth in MiB (Linux)."""
    base = _reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return out, seconds, (peak - base) / 2**20 if base is not None and peak is not None else None


def _reset_peak_rss() -> int | None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return _status("VmRSS")
    except OSError:
        return None


def _peak_rss() -> int | None:
    return _status("VmHWM")


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=100_000)
    parser.add_argument("--num-val", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="cluster-center spread (larger: easier)")
    parser.add_argument("--latent-dim", type=int, default=32, help="intrinsic dimension of the features")
    parser.add_argument("-k", type=int, action="append", help="repeatable; default 10 20 100 200")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None, help="default: calibrated to recall@20 >= 0.95")
    parser.add_argument("--threads", type=int, default=None, help="torch and FAISS threads, both sides (default: all)")
    parser.add_argument("--skip-reference", action="store_true", help="time dinocli only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    ks = args.k or [10, 20, 100, 200]
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    train, ytrain, val, yval = clustered_features(
        args.num_train, args.num_val, args.dim, args.classes, args.spread, args.latent_dim, seed=0
    )
    print(f"{args.num_train} train x {args.num_val} val x {args.dim}-d, {args.classes} classes, "
          f"k={ks}, T={args.temperature}, torch threads={torch.get_num_threads()}")
    rows: dict[str, Any] = {}

    def run_dinocli(spec: IndexSpec) -> dict[int, tuple[float, float]]:
        report = knn_classify(train, ytrain, val, yval, ks, args.temperature, index=spec)
        rows.setdefault(spec.kind, {})["recall"] = report.recall
        return {r.k: (r.top1, r.top5 if r.top5 is not None else r.top1) for r in report.results}

    def run_reference() -> dict[int, tuple[float, float]]:
        # as eval_knn.py: normalise once, then one full search and vote per k
        train_n = torch.nn.functional.normalize(train, dim=1, p=2)
        val_n = torch.nn.functional.normalize(val, dim=1, p=2)
        return {k: reference_knn(train_n, ytrain, val_n, yval, k, args.temperature, args.classes) for k in ks}

    runs = [("flat", lambda: run_dinocli(IndexSpec("flat"))),
            ("ivf", lambda: run_dinocli(IndexSpec("ivf", nlist=args.nlist, nprobe=args.nprobe)))]
    if not args.skip_reference:
        runs.insert(0, ("reference", run_reference))
    for name, fn in runs:
        acc, seconds, mib = measure(fn)
        rows.setdefault(name, {}).update(seconds=seconds, peak_mib=mib, accuracy=acc)
        mem = f"{mib:.0f} MiB" if mib is not None else "n/a"
        recall = rows[name].get("recall")
        extra = ""
        if recall:
            extra = ", recall " + " ".join(f"@{k} {v:.3f}" for k, v in recall["at_k"].items())
            extra += (f" (nlist {recall['nlist']}, nprobe {recall['nprobe']}, re-scored {recall['refine_factor']}k,"
                      f" {recall['sample']} queries)")
        print(f"{name:>9}: {seconds:8.2f} s, peak +{mem}{extra}")
        for k in ks:
            print(f"           k={k:<4} top-1 {acc[k][0]:6.2f}  top-5 {acc[k][1]:6.2f}")
    if "reference" in rows:
        ref = rows["reference"]
        for name in ("flat", "ivf"):
            rows[name]["speedup"] = ref["seconds"] / rows[name]["seconds"]
            print(f"{name} speed-up over the reference: {rows[name]['speedup']:.1f}x")
        same = all(rows["flat"]["accuracy"][k] == ref["accuracy"][k] for k in ks)
        print(f"exact accuracies identical to the reference: {same}")
        rows["identical"] = same
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
