"""Weighted k-nearest-neighbour classification of frozen features, as in the DINO paper.

The vote is the reference's (``eval_knn.py``): features are L2-normalised, each val image's
``k`` most cosine-similar train images vote for their label with weight ``exp(sim / T)``, and the
classes are ranked by their summed votes (ties: the lower class index first). FAISS does the
search; one search at the largest ``k`` serves every ``k`` and temperature, and queries go in
bounded batches so memory stays flat however large the val set.

``ivf`` (CPU) is an inverted file of ``nlist = sqrt(N) / 2`` clusters holding 4-bit product-quantizer
codes scanned with FAISS fast-scan, whose ``k`` best candidates are re-scored by their exact inner
product. Unless given, ``nprobe`` is calibrated on the recall sample against exact search: the
candidates re-scored double until recall@20 probing every cluster reaches 0.95 (PQ codes of
low-dimensional features rank coarsely), then ``nprobe`` grows from ``nlist / 8`` by 1.25x until
recall@20 reaches 0.95; that recall is reported.
Build time counts (k-means costs grow as ``nlist^2``) and fast-scan makes probing cheap, so few,
large clusters pay: on 100k x 384-d (one core), ``nlist`` from ``sqrt(N) / 2.5`` to ``sqrt(N) / 1.6``
build and search within 3% of one another, ``sqrt(N)`` takes 25% longer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dinocli.errors import UsageError
from dinocli.evaluate.features_io import Features, require_same_classes, require_same_model

INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
IVF_KMEANS_ITERATIONS = 10
IVF_TRAIN_POINTS_PER_CLUSTER = 64
PQ_KMEANS_ITERATIONS = 5
PQ_TRAIN_POINTS_PER_CENTROID = 32
PQ_CENTROIDS = 16  # 4-bit codes: what FAISS fast-scan needs
PQ_DIMS_PER_CODE = 4
REFINE_FACTOR = 1  # candidates re-scored exactly, per neighbour asked for
RECALL_AT = 20  # the DINO paper's k; the recall target applies at min(RECALL_AT, largest k)
NPROBE_GROWTH = 1.25


@dataclass(frozen=True)
class IndexSpec:
    """The FAISS index: ``flat`` (exact inner product), ``ivf`` or ``hnsw`` (approximate).

    ``nlist``: IVF clusters (default ``sqrt(N) / 2``, at most ``N / 39``), trained by 10 k-means
    iterations on at most 64 vectors per cluster; ``nprobe``: clusters searched per query (default:
    the smallest of ``nlist/8 * 1.25^i`` whose recall@20 on the recall sample is at least
    ``recall_target``); ``hnsw_m``: graph degree; ``ef_search`` / ``ef_construction``: HNSW search
    and build breadth (``ef_search`` is raised to ``k`` when smaller).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    recall_target: float = 0.95

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise UsageError(f"unknown index {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be positive")
        if not 0 < self.recall_target <= 1:
            raise UsageError(f"the recall target must be in (0, 1], got {self.recall_target}")


@dataclass(frozen=True)
class KnnResult:
    """Accuracies in percent for one ``k`` and temperature; ``top5`` is ``None`` when ``k < 5`` or
    there are fewer than 5 classes (where it would be 100 %)."""

    k: int
    temperature: float
    top1: float
    top5: float | None
    per_class: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        if row["per_class"] is None:
            del row["per_class"]
        return row


@dataclass
class KnnReport:
    """Every result asked for, and what they were computed on."""

    results: list[KnnResult]
    num_train: int
    num_val: int
    num_classes: int
    index: str
    backend: str
    recall: dict[str, Any] | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def top1(self) -> float:
        """Top-1 accuracy (percent) of the first ``k`` and temperature asked for."""
        return self.results[0].top1

    @property
    def top5(self) -> float | None:
        """Top-5 accuracy (percent) of the first ``k`` and temperature asked for."""
        return self.results[0].top5

    def result(self, k: int, temperature: float = DEFAULT_TEMPERATURE) -> KnnResult:
        """The result for ``k`` and ``temperature``."""
        for r in self.results:
            if r.k == k and math.isclose(r.temperature, temperature):
                return r
        raise KeyError((k, temperature))

    def as_dict(self) -> dict[str, Any]:
        """The JSON written by ``dino knn --json``."""
        out: dict[str, Any] = {
            "results": [r.as_dict() for r in self.results],
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_classes": self.num_classes,
            "index": self.index,
            "backend": self.backend,
        }
        if self.recall is not None:
            out["recall"] = self.recall
        return out


class NeighbourIndex:
    """Top-k inner-product search over L2-normalised vectors, with FAISS (or torch on CUDA).

    On a CUDA device FAISS runs on the GPU when it was built with GPU support; otherwise an exact
    search uses chunked ``torch.mm`` + ``topk`` there, and approximate indexes stay on the CPU.
    """

    def __init__(self, train: torch.Tensor, spec: IndexSpec, device: torch.device) -> None:
        import faiss

        self.spec = spec
        self.device = device
        self._ivf: Any = None
        self._fast_scan = False
        n, d = train.shape
        if device.type == "cuda" and spec.kind == "flat" and _faiss_gpus(faiss) == 0:
            self.backend = "torch-cuda"
            self._train = train.to(device, torch.float32)
            return
        x = np.ascontiguousarray(train.detach().cpu().numpy(), dtype=np.float32)
        gpu = device.type == "cuda" and spec.kind != "hnsw" and _faiss_gpus(faiss) > 0
        if spec.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif spec.kind == "ivf":
            index = self._build_ivf(faiss, x, spec.nlist or default_nlist(n), fast_scan=not gpu)
        else:
            index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = spec.ef_construction
        index.add(x)
        self.backend = "faiss-cpu"
        if gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, device.index or 0, index)
            self._ivf = index if spec.kind == "ivf" else None
            self.backend = "faiss-gpu"
        self._index = index

    def _build_ivf(self, faiss: Any, x: np.ndarray, nlist: int, fast_scan: bool) -> Any:
        """A trained IVF index: fast-scan PQ codes re-ranked exactly (CPU), or plain vectors (GPU)."""
        n, d = x.shape
        if nlist > n:
            raise UsageError(f"--nlist {nlist} is larger than the train set ({n} features)")
        if fast_scan and n < PQ_CENTROIDS:
            raise UsageError(f"--index ivf needs at least {PQ_CENTROIDS} train features; use --index flat")
        self._quantizer = faiss.IndexFlatIP(d)  # the IVF index does not own it
        if fast_scan:
            m = pq_codes(d)
            ivf = faiss.IndexIVFPQFastScan(self._quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
            ivf.by_residual = False  # codes of the vectors themselves rank neighbours better here
            ivf.pq.cp.niter = PQ_KMEANS_ITERATIONS
            ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
            ivf.pq.cp.min_points_per_centroid = 1  # the exact re-ranking makes up for a coarse PQ
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = REFINE_FACTOR
        else:
            ivf = index = faiss.IndexIVFFlat(self._quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = IVF_KMEANS_ITERATIONS
        ivf.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_CLUSTER
        index.train(x)
        if fast_scan:
            ivf.pq.sync_transposed_centroids()  # a faster encoder for index.add
        ivf.nprobe = min(nlist, self.spec.nprobe or max(1, nlist // 8))
        self._ivf, self._fast_scan = ivf, fast_scan
        return index

    @property
    def settings(self) -> dict[str, int]:
        """The IVF search parameters in use: ``nlist``, ``nprobe``, and ``refine_factor`` with PQ codes."""
        if self._ivf is None:
            return {}
        out = {"nlist": int(self._ivf.nlist), "nprobe": int(self._ivf.nprobe)}
        return (out | {"refine_factor": int(self._index.k_factor)}) if self._fast_scan else out

    @property
    def nprobe(self) -> int:
        """Clusters searched per query (IVF)."""
        return int(self._ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._ivf.nprobe = value

    def probe_more(self) -> bool:
        """Grow a calibrated ``nprobe`` by 1.25x, up to ``nlist``; ``False`` when it cannot grow."""
        ivf = self._ivf
        if ivf is None or self.spec.nprobe is not None or ivf.nprobe >= ivf.nlist:
            return False
        ivf.nprobe = min(int(ivf.nlist), math.ceil(ivf.nprobe * NPROBE_GROWTH))
        return True

    def refine_more(self, k: int) -> bool:
        """Re-score twice the PQ candidates exactly, up to the train set; ``False`` when it cannot."""
        if not self._fast_scan or self.spec.nprobe is not None or self._index.k_factor * k >= self._ivf.ntotal:
            return False
        self._index.k_factor *= 2
        return True

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and train indices ``[B, k]`` of each query's ``k`` nearest (-1: none found)."""
        if self.backend == "torch-cuda":
            return _torch_topk(queries.to(self.device, torch.float32), self._train, k)
        if self.spec.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.spec.ef_search, k)
        if self._fast_scan:
            self._ivf.implem = 11 if k > 20 else 0  # 11: the candidates in a reservoir, not a heap
        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        sims, idx = self._index.search(q, k)
        return torch.from_numpy(sims), torch.from_numpy(idx).to(torch.int64)


def default_nlist(n: int) -> int:
    """IVF clusters for ``n`` vectors: ``sqrt(n) / 2``, keeping at least 39 vectors per cluster."""
    return max(1, min(round(math.sqrt(n) / 2), n // 39))


def pq_codes(d: int) -> int:
    """Product-quantizer codes per vector: the fewest that split ``d`` into parts of at most 4."""
    return next(m for m in range(max(1, -(-d // PQ_DIMS_PER_CODE)), d + 1) if d % m == 0)


def weighted_vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores ``[B, C]``: each neighbour adds ``exp(sim / T)`` to its label (-1: nothing)."""
    weights = (sims.float() / temperature).exp()
    weights = weights.masked_fill(neighbour_labels < 0, 0.0)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels.clamp_min(0), weights)


def ranked_classes(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` best classes ``[B, n]`` by score, ties broken by the lower class index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each target's position ``[B]`` in :func:`ranked_classes` order (0: first), without sorting."""
    own = scores.gather(1, targets[:, None])
    lower = torch.arange(scores.shape[1], device=scores.device) < targets[:, None]
    return (scores > own).sum(1) + ((scores == own) & lower).sum(1)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int | Sequence[int] = 20,
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURE,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] = (),
    index: str | IndexSpec = "flat",
    device: str | torch.device = "cpu",
    batch_size: int = 4096,
    per_class: bool = False,
    recall_sample: int = 256,
    seed: int = 0,
) -> KnnReport:
    """Weighted k-NN accuracy of ``test`` against ``train`` for every ``k`` x ``temperature``.

    Labels are class indices (>= 0). ``num_classes`` defaults to the larger of
    ``len(class_names)`` and the largest label + 1. An approximate ``index`` also reports its
    recall at every ``k`` against exact search on ``recall_sample`` val features (on which an IVF
    search is calibrated first, unless ``nprobe`` is given).
    """
    from dinocli.runtime import resolve_device

    ks = list(dict.fromkeys(int(x) for x in _as_list(k)))
    temps = list(dict.fromkeys(float(t) for t in _as_list(temperature)))
    spec = index if isinstance(index, IndexSpec) else IndexSpec(kind=index)
    dev = resolve_device(device)
    train_labels = torch.as_tensor(train_labels, dtype=torch.int64).reshape(-1)
    test_labels = torch.as_tensor(test_labels, dtype=torch.int64).reshape(-1)
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "val")
    if train_features.shape[1] != test_features.shape[1]:
        raise UsageError(
            f"the train features are {train_features.shape[1]}-dimensional but the val features "
            f"are {test_features.shape[1]}-dimensional; extract both with the same backbone and options"
        )
    n_train, n_val = train_features.shape[0], test_features.shape[0]
    if not ks or not temps:
        raise UsageError("give at least one k and one temperature")
    if min(ks) < 1:
        raise UsageError(f"k must be at least 1, got {min(ks)}")
    if max(ks) > n_train:
        raise UsageError(f"k={max(ks)} is larger than the train set ({n_train} features)")
    if min(temps) <= 0:
        raise UsageError(f"the temperature must be positive, got {min(temps)}")
    if batch_size < 1:
        raise UsageError(f"the query batch size must be positive, got {batch_size}")
    if recall_sample < 1:
        raise UsageError(f"the recall sample must be positive, got {recall_sample}")
    largest = int(max(train_labels.max(), test_labels.max())) + 1
    n_classes = max(largest, len(class_names), num_classes or 0)
    names = list(class_names) + [str(i) for i in range(len(class_names), n_classes)]

    train = _normalise(train_features)
    kmax = max(ks)
    nn_index = NeighbourIndex(train, spec, dev)
    recall = None
    if spec.kind != "flat":
        recall = _calibrate(nn_index, train, test_features, ks, recall_sample, seed)
    del train  # the index holds its own copy; keep memory to one copy of the train set
    vote_dev = dev if nn_index.backend != "faiss-cpu" else torch.device("cpu")
    train_labels_dev = train_labels.to(vote_dev)
    top1 = torch.zeros(len(ks), len(temps), dtype=torch.int64)
    top5 = torch.zeros_like(top1)
    class_hits = torch.zeros(len(ks), len(temps), n_classes, dtype=torch.int64)
    for start in range(0, n_val, batch_size):
        queries = _normalise(test_features[start : start + batch_size])
        targets = test_labels[start : start + batch_size].to(vote_dev)
        sims, idx = nn_index.search(queries, kmax)
        sims, idx = sims.to(vote_dev), idx.to(vote_dev)
        neighbour_labels = torch.where(idx >= 0, train_labels_dev[idx.clamp_min(0)], -1)
        for i, kk in enumerate(ks):
            for j, t in enumerate(temps):
                scores = weighted_vote(sims[:, :kk], neighbour_labels[:, :kk], n_classes, t)
                rank = target_rank(scores, targets)
                first = rank == 0
                top1[i, j] += int(first.sum())
                top5[i, j] += int((rank < 5).sum())
                if per_class:
                    class_hits[i, j] += torch.bincount(targets[first], minlength=n_classes).cpu()

    counts = torch.bincount(test_labels, minlength=n_classes)
    results = []
    for i, kk in enumerate(ks):
        for j, t in enumerate(temps):
            per = None
            if per_class:
                per = {
                    names[c]: 100.0 * int(class_hits[i, j, c]) / int(counts[c])
                    for c in range(n_classes)
                    if counts[c] > 0
                }
            results.append(
                KnnResult(
                    k=kk,
                    temperature=t,
                    top1=100.0 * int(top1[i, j]) / n_val,
                    top5=100.0 * int(top5[i, j]) / n_val if kk >= 5 and n_classes >= 5 else None,
                    per_class=per,
                )
            )
    return KnnReport(results, n_train, n_val, n_classes, spec.kind, nn_index.backend, recall, names)


def knn_features(
    train: Features, val: Features, k: int | Sequence[int] = 20, **options: Any
) -> KnnReport:
    """:func:`knn_classify` of two :class:`Features` (as ``dino extract`` writes them)."""
    for feats, what in ((train, "train"), (val, "val")):
        if len(feats) and not feats.labelled:
            raise UsageError(
                f"the {what} features are unlabelled (extracted from a folder without class "
                "folders); k-NN needs images in <class>/<image> folders"
            )
    require_same_classes(train.classes, val.classes)
    require_same_model(train, val)
    options.setdefault("class_names", train.classes or val.classes)
    return knn_classify(train.features, train.labels, val.features, val.labels, k, **options)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each row of ``exact`` (indices ``[B, k]``) found in the same row of ``approx``."""
    found = 0
    for a, e in zip(approx.tolist(), exact.tolist()):
        found += len(set(a) & set(e))
    return found / max(1, exact.numel())


def _calibrate(
    nn_index: NeighbourIndex,
    train: torch.Tensor,
    test_features: torch.Tensor,
    ks: list[int],
    sample: int,
    seed: int,
) -> dict[str, Any]:
    """Recall at every ``k`` on ``sample`` val features, after calibrating an IVF search whose
    ``nprobe`` was not given: the exact re-scoring first (all clusters probed), then ``nprobe``."""
    n = min(sample, test_features.shape[0])
    rows = torch.randperm(test_features.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    queries = _normalise(test_features[rows])
    kmax, at = max(ks), min(RECALL_AT, max(ks))
    truth = _torch_topk(queries, train, kmax)[1]
    target = nn_index.spec.recall_target

    def recall() -> tuple[float, torch.Tensor]:
        approx = nn_index.search(queries, kmax)[1].cpu()
        return recall_at_k(approx[:, :at], truth[:, :at]), approx

    if "refine_factor" in nn_index.settings and nn_index.spec.nprobe is None:
        start, nn_index.nprobe = nn_index.nprobe, nn_index.settings["nlist"]
        while recall()[0] < target and nn_index.refine_more(kmax):
            pass
        nn_index.nprobe = start
    while (found := recall())[0] < target and nn_index.probe_more():
        pass
    approx = found[1]
    at_k = {str(k): recall_at_k(approx[:, :k], truth[:, :k]) for k in sorted(ks)}
    return {"sample": n, "at_k": at_k, **nn_index.settings}


def _check(features: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise UsageError(f"the {what} features must be a non-empty [N, D] matrix")
    if labels.shape[0] != features.shape[0]:
        raise UsageError(f"{features.shape[0]} {what} features but {labels.shape[0]} labels")
    if (labels < 0).any():
        raise UsageError(
            f"the {what} set is unlabelled ({int((labels < 0).sum())} labels are -1); k-NN "
            "needs images in <class>/<image> folders"
        )
    bad = ~torch.isfinite(features)
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten()
        raise UsageError(
            f"the {what} features hold NaN or infinite values ({len(rows)} rows, the first is "
            f"row {int(rows[0])}); extract them again, e.g. with --precision fp32"
        )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1, p=2)


def _torch_topk(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = max(1, (1 << 27) // train.shape[0])
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s, i = (queries[start : start + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _faiss_gpus(faiss: Any) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]
