"""Linear evaluation of frozen features, the DINO paper's second number (``eval_linear.py``).

The reference recipe: ``nn.Linear(D, C)`` with weights ``N(0, 0.01)`` and zero bias, cross-entropy,
SGD with momentum 0.9 and no weight decay, the learning rate ``lr * batch_size / 256`` (lr 0.001,
batch 128) annealed by a cosine over 100 epochs (``CosineAnnealingLR``, stepped per epoch), the
train set visited in ``DistributedSampler`` order (``randperm`` seeded ``seed + epoch``), val
accuracy after every epoch. :func:`train_linear` runs it on any stream of feature batches: cached
features (no augmentation) or, in :mod:`dinocli.evaluate.linear_images`, random-resized crops of
the train images through the frozen backbone every epoch. The fast sweep over many learning rates
at once is :mod:`dinocli.evaluate.linear_sweep`.

A trained classifier is a :class:`LinearClassifier`; :func:`save_classifier` writes it as
safetensors (``weight`` ``[C, D]``, ``bias`` ``[C]``) with the classes, the features' options and
the recipe in its metadata.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dinocli.errors import UsageError
from dinocli.evaluate.features_io import Features, model_difference, require_same_classes, require_same_model
from dinocli.evaluate.knn import target_rank
from dinocli.io import atomic_path

REFERENCE_LR = 0.001  # per 256 images, as eval_linear.py
REFERENCE_EPOCHS = 100
REFERENCE_BATCH_SIZE = 128
MOMENTUM = 0.9
INIT_STD = 0.01
LR_REFERENCE_BATCH = 256
#: metadata key of the JSON object describing a classifier file.
CLASSIFIER_META_KEY = "dinocli.linear"
#: the features' options a classifier must be applied with (their metadata keys).
FEATURE_OPTIONS = (
    "n_last_blocks", "avgpool_patch_tokens", "preprocessing", "backbone", "weights", "weights_sha256",
    "backbone_sha256", "checkpoint_key", "seed",
)  # fmt: skip

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class LinearClassifier:
    """A linear classifier ``logits = features @ weight.T + bias`` over ``classes``."""

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """The feature dimension ``D``."""
        return int(self.weight.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def logits(self, features: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Class scores ``[N, C]`` (float32, on the classifier's device) of features ``[N, D]``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise UsageError(
                f"the classifier takes {self.dim}-dimensional features, got shape {list(features.shape)}; "
                "extract them with the backbone and options it was trained on"
            )
        w, b = self.weight.float(), self.bias.float()
        parts = [
            torch.addmm(b, features[i : i + batch_size].to(w.device, torch.float32), w.T)
            for i in range(0, features.shape[0], batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.num_classes, device=w.device)

    def accuracy(self, feats: Features) -> tuple[float, float | None]:
        """Top-1 and top-5 accuracy (percent; top-5 ``None`` under 5 classes) on labelled features."""
        check_labelled(feats, "val")
        if feats.classes and self.classes and feats.classes != self.classes:
            raise UsageError(
                f"the classifier was trained on classes {_preview(self.classes)} but the features have "
                f"{_preview(feats.classes)}"
            )
        if int(feats.labels.max()) >= self.num_classes:
            raise UsageError(
                f"the features have label {int(feats.labels.max())} but the classifier has {self.num_classes} classes"
            )
        return accuracy(self.logits(feats.features), feats.labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float | None]:
    """Top-1 and top-5 accuracy in percent (top-5 ``None`` under 5 classes); ties rank the lower class first."""
    rank = target_rank(logits.float(), labels.to(logits.device))
    n = max(1, labels.shape[0])
    top1 = 100.0 * int((rank == 0).sum()) / n
    top5 = 100.0 * int((rank < 5).sum()) / n if logits.shape[1] >= 5 else None
    return top1, top5


def scaled_lr(lr: float, batch_size: int) -> float:
    """The reference's linear scaling rule: ``lr`` is given for 256 images a batch."""
    return lr * batch_size / LR_REFERENCE_BATCH


def cosine_factor(epoch: int, epochs: int) -> float:
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)``'s multiplier of the base lr during ``epoch``."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the train set in ``epoch``: ``DistributedSampler(shuffle=True, seed)`` on one process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def initial_weights(dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's initialisation: weight ``[C, D]`` ~ ``N(0, 0.01)`` (seeded), bias 0."""
    weight = torch.empty(num_classes, dim).normal_(0.0, INIT_STD, generator=torch.Generator().manual_seed(seed))
    return weight, torch.zeros(num_classes)


def cached_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int
) -> Batches:
    """``epoch -> batches`` of cached features in the reference's order (the last batch may be short)."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(features.shape[0], seed, epoch).to(features.device)
        for start in range(0, order.shape[0], batch_size):
            idx = order[start : start + batch_size]
            yield features[idx], labels[idx]

    return batches


@dataclass(frozen=True)
class EpochResult:
    """Val accuracy (percent) after one epoch of :func:`train_linear`, and the epoch's mean train loss."""

    epoch: int
    top1: float
    top5: float | None
    loss: float


def train_linear(
    batches: Batches,
    dim: int,
    num_classes: int,
    *,
    lr: float = REFERENCE_LR,
    weight_decay: float = 0.0,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = REFERENCE_BATCH_SIZE,
    seed: int = 0,
    device: torch.device | str = "cpu",
    validate: Callable[[LinearClassifier], tuple[float, float | None]] | None = None,
    val_every: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[LinearClassifier, list[EpochResult]]:
    """The reference recipe on ``batches(epoch)`` (see the module docstring).

    ``lr`` is per 256 images (scaled by ``batch_size``, which must be the size of ``batches``'
    batches). ``validate(classifier)`` gives val top-1/top-5 after every ``val_every``-th epoch and
    the last, as ``eval_linear.py`` does; ``progress`` is called with 1 after each epoch.
    """
    check_recipe(epochs, batch_size, [lr], [weight_decay])
    dev = torch.device(device)
    layer = torch.nn.utils.skip_init(torch.nn.Linear, dim, num_classes, device=dev)  # no draw from the global RNG
    weight, bias = initial_weights(dim, num_classes, seed)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    optimizer = torch.optim.SGD(
        layer.parameters(), scaled_lr(lr, batch_size), momentum=MOMENTUM, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    history: list[EpochResult] = []
    classifier = LinearClassifier(layer.weight.detach(), layer.bias.detach())
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y in batches(epoch):
            loss = loss_fn(layer(x.to(dev, torch.float32)), y.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * y.shape[0]
            seen += y.shape[0]
        scheduler.step()
        if validate is not None and (epoch % val_every == 0 or epoch == epochs - 1):
            top1, top5 = validate(classifier)
            history.append(EpochResult(epoch, top1, top5, total / max(1, seen)))
        if progress is not None:
            progress(1)
    return LinearClassifier(layer.weight.detach().clone(), layer.bias.detach().clone()), history


def check_recipe(epochs: int, batch_size: int, lrs: Iterable[float], weight_decays: Iterable[float]) -> None:
    """A clear error for each impossible training option."""
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise UsageError(f"the linear batch size (--linear-batch-size) must be positive, got {batch_size}")
    lrs, weight_decays = list(lrs), list(weight_decays)
    if not lrs or not weight_decays:
        raise UsageError("give at least one learning rate and one weight decay")
    if min(lrs) <= 0 or not all(math.isfinite(v) for v in lrs):
        raise UsageError(f"learning rates must be positive, got {min(lrs)}")
    if min(weight_decays) < 0 or not all(math.isfinite(v) for v in weight_decays):
        raise UsageError(f"weight decays must be 0 or more, got {min(weight_decays)}")


def check_labels(labels: torch.Tensor, what: str) -> None:
    """A clear error unless ``labels`` is a non-empty set of class indices (none -1)."""
    if labels.numel() == 0:
        raise UsageError(f"the {what} set is empty")
    if (labels < 0).any():
        raise UsageError(
            f"the {what} set is unlabelled ({int((labels < 0).sum())} labels are -1); linear "
            "evaluation needs images in <class>/<image> folders"
        )


def check_labelled(feats: Features, what: str) -> None:
    """A clear error unless ``feats`` is a non-empty, finite, labelled set."""
    check_labels(feats.labels, what)
    bad = ~torch.isfinite(feats.features)
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten()
        raise UsageError(
            f"the {what} features hold NaN or infinite values ({len(rows)} rows, the first is row "
            f"{int(rows[0])}); extract them again, e.g. with --precision fp32"
        )


def check_pair(train: Features, val: Features | None) -> tuple[int, list[str]]:
    """Check a train (and val) set for training; returns the number of classes and their names."""
    check_labelled(train, "train")
    if val is not None:
        check_labelled(val, "val")
        require_same_model(train, val)
        if train.dim != val.dim:
            raise UsageError(
                f"the train features are {train.dim}-dimensional but the val features are {val.dim}-dimensional; "
                "extract both with the same backbone and options"
            )
    return class_names(train.labels, train.classes, val)


def class_names(labels: torch.Tensor, classes: list[str], val: Features | None) -> tuple[int, list[str]]:
    """The number of classes and their names, from the train labels and classes (and val's); an error
    where train and val name different classes or train has fewer than two."""
    if val is not None:
        require_same_classes(classes, val.classes)
    largest = int(labels.max()) + 1
    if val is not None:
        largest = max(largest, int(val.labels.max()) + 1)
    names = list(classes or (val.classes if val is not None else []))
    n_classes = max(largest, len(names))
    names += [str(i) for i in range(len(names), n_classes)]
    present = int(torch.unique(labels).numel())
    if present < 2:
        raise UsageError(f"the train set has images of {present} class; a classifier needs at least 2")
    return n_classes, names


@dataclass
class LinearReport:
    """The accuracy of a trained linear classifier, and how it was trained.

    ``top1``/``top5``: val accuracy (percent) of ``classifier`` (the last epoch's); ``best_top1`` /
    ``best_epoch``: the best val top-1 over the validated epochs, the figure ``eval_linear.py``
    prints (reference mode); ``sweep``: every (lr, weight decay) tried, with its held-out accuracy
    (fast mode).
    """

    mode: str
    classifier: LinearClassifier
    top1: float | None
    top5: float | None
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    num_train: int
    num_val: int
    num_classes: int
    seconds: float
    device: str
    precision: str = "fp32"
    num_holdout: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    sweep: list[dict[str, Any]] = field(default_factory=list)
    history: list[EpochResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON written by ``dino linear --json``."""
        out = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("classifier", "history")
            and (k == "top5" or not (v is None or v == [] or (k == "num_holdout" and v == 0)))
        }
        if self.history:
            out["history"] = [asdict(h) for h in self.history]
        return out


def save_classifier(path: str | Path, classifier: LinearClassifier) -> None:
    """Write ``classifier`` to ``path`` (safetensors) atomically."""
    meta = {
        "classes": json.dumps(list(classifier.classes)),
        CLASSIFIER_META_KEY: json.dumps(classifier.metadata, sort_keys=True, default=str),
    }
    tensors = {
        "weight": classifier.weight.detach().to("cpu", torch.float32).contiguous(),
        "bias": classifier.bias.detach().to("cpu", torch.float32).contiguous(),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_classifier(path: str | Path) -> LinearClassifier:
    """Read a classifier written by :func:`save_classifier` (``dino linear --output``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"classifier file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            if not {"weight", "bias"} <= keys:
                raise UsageError(f"{path} is not a dinocli linear classifier (it lacks weight and bias tensors)")
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid safetensors classifier file: {exc}") from None
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise UsageError(f"{path}: weight {list(weight.shape)} and bias {list(bias.shape)} do not form a classifier")
    try:
        classes = json.loads(meta.get("classes", "[]"))
        info = json.loads(meta.get(CLASSIFIER_META_KEY, "{}"))
    except json.JSONDecodeError:
        raise UsageError(f"{path}: its metadata is not valid JSON") from None
    return LinearClassifier(weight.float(), bias.float(), list(classes), info)


def check_features_match(classifier: LinearClassifier, feats: Features) -> None:
    """A clear error where ``feats`` were made with other feature options than the classifier's."""
    trained = classifier.metadata.get("features", {})
    for key in ("n_last_blocks", "avgpool_patch_tokens"):
        if key in trained and key in feats.metadata and trained[key] != feats.metadata[key]:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"the classifier was trained on features with {flag} {trained[key]}, these have {feats.metadata[key]}"
            )
    difference = model_difference(trained, feats.metadata)
    if difference is not None:
        raise UsageError(
            f"the classifier was trained on features extracted differently ({difference}); "
            "extract the val set with the same --weights and options"
        )


def feature_options(feats: Features) -> dict[str, Any]:
    """The features' options a classifier trained on them records."""
    return {k: feats.metadata[k] for k in FEATURE_OPTIONS if k in feats.metadata}


def _preview(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return f"{len(names)}: {shown}{', ...' if len(names) > n else ''}"


def linear_reference(
    train: Features,
    val: Features,
    *,
    lr: float = REFERENCE_LR,
    weight_decay: float = 0.0,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = REFERENCE_BATCH_SIZE,
    seed: int = 0,
    device: str | torch.device = "auto",
    val_every: int = 1,
    progress: Callable[[int], None] | None = None,
) -> LinearReport:
    """The reference recipe on cached features (no augmentation): one lr, val every ``val_every`` epochs."""
    from dinocli.runtime import resolve_device

    start = time.perf_counter()
    n_classes, names = check_pair(train, val)
    if val_every < 1:
        raise UsageError(f"--val-every must be at least 1, got {val_every}")
    dev = resolve_device(device)
    x, y = train.features.to(dev, torch.float32), train.labels.to(dev)
    val_x, val_y = val.features.to(dev, torch.float32), val.labels.to(dev)
    classifier, history = train_linear(
        cached_batches(x, y, batch_size, seed),
        train.dim,
        n_classes,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=dev,
        validate=lambda clf: accuracy(clf.logits(val_x), val_y),
        val_every=val_every,
        progress=progress,
    )
    return reference_report(
        classifier, history, names, feature_options(train), len(train), len(val), dev, time.perf_counter() - start,
        lr=lr, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=seed, augmented=False,
    )  # fmt: skip


def reference_report(
    classifier: LinearClassifier,
    history: list[EpochResult],
    names: list[str],
    features: dict[str, Any],
    num_train: int,
    num_val: int,
    dev: torch.device,
    seconds: float,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
    augmented: bool,
) -> LinearReport:
    """The :class:`LinearReport` of a reference-mode run (the classifier gets its names and metadata)."""
    classifier.classes = names
    classifier.metadata = {
        "mode": "reference",
        "augmented": augmented,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "features": features,
    }
    last = history[-1]
    best = max(history, key=lambda h: h.top1)
    return LinearReport(
        mode="reference",
        classifier=LinearClassifier(classifier.weight.cpu(), classifier.bias.cpu(), names, classifier.metadata),
        top1=last.top1,
        top5=last.top5,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=batch_size,
        num_train=num_train,
        num_val=num_val,
        num_classes=len(names),
        seconds=seconds,
        device=str(dev),
        best_top1=best.top1,
        best_epoch=best.epoch,
        history=history,
    )
