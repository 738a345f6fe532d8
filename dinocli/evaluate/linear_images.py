"""The reference linear evaluation on images: augmented train crops through the frozen backbone every epoch.

As ``eval_linear.py``: each epoch the train images are visited in ``DistributedSampler`` order
(seed ``seed``, ``set_epoch``), each one a ``RandomResizedCrop(crop_size)`` (scale 0.08-1,
bilinear) with a random horizontal flip, normalised; the backbone runs in eval mode under
``no_grad``, its features (:func:`dinocli.evaluate.extract.embed`: the last ``n_last_blocks`` CLS
tokens, optionally the mean patch token) go to :func:`dinocli.evaluate.linear.train_linear`.
The val images are centre crops, which never change, so their features are extracted once rather
than every epoch (the same numbers). The random crops come from seeded generators: a run repeats
exactly on the same machine with the same ``num_workers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from dinocli.errors import DinoError, UsageError
from dinocli.evaluate.extract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _batches,
    _collate,
    _Images,
    embed,
)
from dinocli.evaluate.features_io import Features
from dinocli.evaluate.linear import (
    REFERENCE_BATCH_SIZE,
    REFERENCE_EPOCHS,
    REFERENCE_LR,
    LinearReport,
    accuracy,
    check_labelled,
    check_labels,
    check_recipe,
    class_names,
    feature_options,
    reference_report,
    train_linear,
)
from dinocli.runtime import autocast, resolve_device, resolve_precision

#: RandomResizedCrop's defaults, as the reference uses them.
CROP_SCALE = (0.08, 1.0)


def train_transform(crop_size: int) -> Callable[[Any], torch.Tensor]:
    """The reference's train augmentation: random-resized crop, horizontal flip, ImageNet normalisation."""
    if crop_size < 1:
        raise UsageError(f"--crop-size must be positive, got {crop_size}")
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size, scale=CROP_SCALE),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def augmented_batches(
    model: nn.Module,
    paths: Sequence[Any],
    labels: torch.Tensor,
    *,
    crop_size: int,
    n_last_blocks: int,
    avgpool_patch_tokens: bool,
    batch_size: int,
    num_workers: int,
    precision: str,
    device: torch.device,
    seed: int,
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """``epoch -> (features, labels)`` batches of augmented train images through the frozen ``model``."""
    dataset = _Images(list(paths), train_transform(crop_size))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler.set_epoch(epoch)
        order = list(sampler)
        done = 0
        for images in _batches(loader):
            idx = torch.tensor(order[done : done + len(images)])
            done += len(images)
            with torch.no_grad(), autocast(precision, device):
                feats = embed(model, images.to(device, non_blocking=True), n_last_blocks, avgpool_patch_tokens)
            feats = feats.float()
            if not torch.isfinite(feats).all():
                raise DinoError("the backbone produced NaN or infinite features; try --precision fp32")
            yield feats, labels[idx].to(device)

    return batches


def linear_reference_images(
    model: nn.Module,
    train_paths: Sequence[Any],
    train_labels: Sequence[int] | torch.Tensor,
    val: Features,
    *,
    classes: Sequence[str] = (),
    crop_size: int = 224,
    n_last_blocks: int = 1,
    avgpool_patch_tokens: bool = False,
    lr: float = REFERENCE_LR,
    weight_decay: float = 0.0,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = REFERENCE_BATCH_SIZE,
    num_workers: int = 0,
    precision: str = "auto",
    device: str | torch.device = "auto",
    seed: int = 0,
    val_every: int = 1,
    progress: Callable[[int], None] | None = None,
) -> LinearReport:
    """The reference recipe with augmentation (see the module docstring) against ``val`` features.

    ``val`` must be extracted from the same ``model`` with the same ``n_last_blocks`` and
    ``avgpool_patch_tokens`` (e.g. by :func:`dinocli.evaluate.extract_folder`). ``progress`` gets 1 per epoch.
    """
    start = time.perf_counter()
    if not train_paths:
        raise UsageError("the train folder has no images")
    labels = torch.as_tensor(train_labels, dtype=torch.int64).reshape(-1)
    if labels.shape[0] != len(train_paths):
        raise UsageError(f"{len(train_paths)} train images but {labels.shape[0]} labels")
    check_recipe(epochs, batch_size, [lr], [weight_decay])
    if val_every < 1:
        raise UsageError(f"--val-every must be at least 1, got {val_every}")
    check_labels(labels, "train")
    check_labelled(val, "val")
    _, names = class_names(labels, list(classes), val)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    was_training = model.training
    model.eval().to(dev)
    val_x, val_y = val.features.to(dev, torch.float32), val.labels.to(dev)
    batches = augmented_batches(
        model, train_paths, labels, crop_size=crop_size, n_last_blocks=n_last_blocks,
        avgpool_patch_tokens=avgpool_patch_tokens, batch_size=batch_size, num_workers=num_workers,
        precision=prec, device=dev, seed=seed,
    )  # fmt: skip
    try:
        with torch.random.fork_rng(devices=[]):  # the crops of workerless loading: seeded, and no global side effect
            torch.manual_seed(seed)
            classifier, history = train_linear(
                batches, val.dim, len(names), lr=lr, weight_decay=weight_decay, epochs=epochs,
                batch_size=batch_size, seed=seed, device=dev, validate=lambda c: accuracy(c.logits(val_x), val_y),
                val_every=val_every, progress=progress,
            )  # fmt: skip
    finally:
        model.train(was_training)
    report = reference_report(
        classifier, history, names, feature_options(val), len(labels), len(val), dev, time.perf_counter() - start,
        lr=lr, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, seed=seed, augmented=True,
    )  # fmt: skip
    report.precision = prec
    report.classifier.metadata["crop_size"] = crop_size
    return report

