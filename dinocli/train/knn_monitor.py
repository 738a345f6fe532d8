"""k-NN monitoring during training: the teacher's weighted k-NN top-1 on a labelled image set.

It calls the same code as ``dino knn`` (:func:`dinocli.evaluate.extract_folder` and
:func:`dinocli.evaluate.knn_features`): images are resized to ``crop_size * 256 / 224`` (the
reference evaluation's ratio), center-cropped to the training's global crop size and normalised
with the ImageNet statistics; k = 20, temperature 0.07, cosine similarity. With ``linear_every``,
every that many epochs the same features also train ``dino linear``'s fast probe
(:func:`dinocli.evaluate.linear_sweep`: DINOv2's 13 learning rates, 100 epochs, the best on 10 %
of train held out), reported as ``linear_top1``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from dinocli.data import list_labelled_images
from dinocli.data.shards import shard_paths
from dinocli.errors import UsageError
from dinocli.evaluate.extract import reference_resize

K = 20


class KnnMonitor:
    """Evaluates a backbone every ``every`` epochs (and after the last one) on ``train``/``val``."""

    def __init__(
        self,
        train: str | Path,
        val: str | Path,
        every: int,
        crop_size: int,
        *,
        k: int = K,
        batch_size: int = 64,
        num_workers: int = 0,
        precision: str = "fp32",
        linear_every: int = 0,
    ) -> None:
        self.train, self.val, self.every, self.k = Path(train), Path(val), every, k
        self.linear_every, self._linear_due = linear_every, False
        self.crop_size = crop_size
        self.resize = reference_resize(crop_size)
        self.batch_size, self.num_workers, self.precision = batch_size, num_workers, precision
        self.n_train = self._check(self.train, "--knn-train", minimum=k)
        self.n_val = self._check(self.val, "--knn-val", minimum=1)

    def _check(self, root: Path, flag: str, minimum: int) -> int:
        if not root.is_dir() and shard_paths(root) is None:
            raise UsageError(f"{flag} {root} is not a folder")
        paths, labels, classes = list_labelled_images(root)
        if not classes or (labels and min(labels) < 0):
            raise UsageError(
                f"{flag} {root} has no class folders; k-NN monitoring needs <class>/<image> folders"
            )
        if len(paths) < minimum:
            raise UsageError(f"{flag} {root} has {len(paths)} images; k-NN with k={self.k} needs at least {minimum}")
        return len(paths)

    def due(self, completed_epochs: int, last_epoch: int) -> bool:
        """Whether to evaluate after ``completed_epochs`` epochs of a run that ends at ``last_epoch``
        (and whether that evaluation includes the linear probe)."""
        last = completed_epochs == last_epoch
        self._linear_due = bool(self.linear_every) and (completed_epochs % self.linear_every == 0 or last)
        return completed_epochs % self.every == 0 or last

    def evaluate(self, backbone: nn.Module) -> dict[str, Any]:
        """``{"knn_top1": %, "knn_k": k, "knn_time_s": s}`` of ``backbone`` (its mode is restored),
        with ``linear_top1``, ``linear_lr`` and ``linear_time_s`` when :meth:`due` said so."""
        from dinocli.evaluate import extract_folder, knn_features, linear_sweep

        start = time.perf_counter()
        options = dict(
            resize=self.resize, crop_size=self.crop_size, batch_size=self.batch_size,
            num_workers=self.num_workers, precision=self.precision,
        )
        train = extract_folder(backbone, self.train, **options)
        val = extract_folder(backbone, self.val, **options)
        report = knn_features(train, val, k=self.k, device=_device_of(backbone))
        result: dict[str, Any] = {
            "knn_top1": report.result(self.k).top1,
            "knn_k": self.k,
            "knn_time_s": time.perf_counter() - start,
        }
        if self._linear_due:
            linear = linear_sweep(train, val, device=_device_of(backbone))
            result.update(linear_top1=linear.top1, linear_lr=linear.lr, linear_time_s=linear.seconds)
        return result


def _device_of(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return str(param.device) if param is not None else "cpu"


__all__ = ["K", "KnnMonitor"]
