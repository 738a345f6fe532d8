"""The training data set: multi-crop views of a list of images, reproducible per (seed, epoch, index).

Item ``i`` in epoch ``e`` is augmented with a :class:`torch.Generator` seeded from
``(seed, epoch, i)`` through numpy's ``SeedSequence``, so a run gives the same crops whatever the
number of workers, and each epoch sees fresh crops. The epoch lives in shared memory, so
:meth:`MultiCropDataset.set_epoch` reaches worker processes too (call it before iterating the
data loader for that epoch, as with ``DistributedSampler``).

An augmentation that can plan its crops from the image size (the built-in ``dino``: methods
``plan``, ``draft_factor``, ``crops`` and ``colour``) gets its random parameters before the image
is decoded, so a large JPEG is decoded at reduced size when every crop allows it. With
``on_device=True`` (``--augment-on gpu``) items are the encoded file and its views' parameters
(:class:`~dinocli.augmentations.device.EncodedViews`): the batch is decoded, cropped and coloured
on the training device (:class:`~dinocli.augmentations.device.EncodedBatch`). With ``levels=True``
(training on a GPU with the augmentation in the workers) items are the views as uint8 levels and
the device normalises them (:class:`LevelBatch`): the same floats from a quarter of the bytes
through shared memory, pinned memory and the bus. With ``colour_on_device=True``
(``--augment-on split``) items are the cut, resized and flipped views as uint8 levels with their
colour parameters, and the device colours and normalises them. Other augmentations get the
decoded RGB image.

``paths`` may be files or members of tar shards (:class:`~dinocli.data.shards.ShardMember`).
Undecodable images are skipped (the item is ``None``, and :func:`collate_multicrop` drops it and
counts it) or stop the run with a :class:`BadImageError` naming the file (``SHARD:MEMBER``).
"""

from __future__ import annotations

import inspect
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinocli.augmentations.device import EncodedBatch, EncodedViews, read_for_device, view_boxes
from dinocli.augmentations.gpu import ColourParams, colour_batch, normalize
from dinocli.data.images import DECODE_ERRORS, image_file, load_rgb, open_rgb, quiet_large_images, read_image_bytes
from dinocli.data.shards import ShardMember, as_image
from dinocli.errors import DinoError, UsageError
from dinocli.interfaces import Augmentation, require_crops

OnBadImage = Literal["skip", "fail"]


class BadImageError(DinoError):
    """An image that cannot be decoded, with ``on_bad_image="fail"``.

    DataLoader workers re-raise errors as ``type(exc)(message_with_traceback)``; the constructor
    keeps only the original one-line message, so the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class LevelViews(NamedTuple):
    """One image's views as uint8 levels ``[3, s, s]``, and what is still to apply: the colour
    operations of its views' parameters (``colour``; None when the views are coloured) and the
    normalisation."""

    views: list[torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colour: ColourParams | None = None


class LevelBatch:
    """A batch of :class:`LevelViews`: one uint8 ``[B, 3, s, s]`` per view; :meth:`finish` copies
    them to a device, colours them there (``--augment-on split``) and normalises them: the floats
    the workers would have made."""

    def __init__(self, items: Sequence[LevelViews]) -> None:
        self.views = [torch.stack(views) for views in zip(*(item.views for item in items))]
        self.mean, self.std = items[0].mean, items[0].std
        self.colour = None  # [B, V, ...], stacked in the worker (--augment-on split)
        if items[0].colour is not None:
            self.colour = ColourParams.stack([item.colour for item in items])

    def __len__(self) -> int:
        return int(self.views[0].shape[0])

    def pin_memory(self) -> LevelBatch:
        """Called by ``DataLoader(pin_memory=True)``: copies to the device without waiting."""
        self.views = [v.pin_memory() for v in self.views]
        return self

    def finish(self, device: torch.device | str) -> list[torch.Tensor]:
        """The (coloured and) normalised float32 views on ``device``."""
        if self.colour is None:
            return [normalize(v.to(device, non_blocking=True), self.mean, self.std) for v in self.views]
        return colour_batch(self.views, self.colour.per_view(), self.mean, self.std, torch.device(device))


class MultiCropBatch(NamedTuple):
    """A collated batch: one ``[B, 3, h, w]`` tensor per view, and how many images were skipped.

    ``crops`` is empty when every image of the batch was skipped; it is an :class:`EncodedBatch`
    or a :class:`LevelBatch` (call ``finish(device)`` for the views) when the items were
    :class:`EncodedViews` or :class:`LevelViews`.
    """

    crops: list[torch.Tensor] | EncodedBatch | LevelBatch
    n_skipped: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed that mixes ``(seed, epoch, index)`` (numpy ``SeedSequence``)."""
    entropy = [int(seed) % 2**64, int(epoch), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1


class MultiCropDataset(Dataset):
    """Multi-crop views of ``paths``; ``dataset[i]`` is the list of crops, or ``None`` if skipped.

    ``name`` names the augmentation in errors (``augmentation 'x' from plugin 'p'``)."""

    def __init__(
        self,
        paths: Sequence[str | Path | ShardMember],
        augmentation: Augmentation,
        seed: int = 0,
        on_bad_image: OnBadImage = "skip",
        on_device: bool = False,
        levels: bool = False,
        colour_on_device: bool = False,
        name: str | None = None,
    ) -> None:
        self.name = name or f"augmentation {type(augmentation).__name__}"
        self.plans = all(hasattr(augmentation, m) for m in ("plan", "draft_factor", "crops", "colour"))
        if (on_device or colour_on_device) and not (self.plans and hasattr(augmentation, "specs")):
            raise UsageError(
                f"{self.name} cannot run on the device (it has no "
                "crop plan and colour stages); use --augment-on cpu"
            )
        self.on_device = bool(on_device)
        self.colour_on_device = bool(colour_on_device) and not self.on_device
        self.levels = (bool(levels) and not self.on_device and not self.colour_on_device
                       and _colours_to_levels(augmentation))
        if on_bad_image not in ("skip", "fail"):
            raise UsageError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        if not paths:
            raise UsageError("the training data set has no images")
        self.paths = [as_image(p) for p in paths]
        self.augmentation = augmentation
        self.seed = int(seed)
        self.on_bad_image = on_bad_image
        self._reported: set[Any] = set()  # the unreadable images this process has named
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose crops the next items get."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Use the crops of ``epoch`` from now on (in this process and in live workers)."""
        if epoch < 0:
            raise UsageError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.paths)

    def generator(self, index: int) -> torch.Generator:
        """The generator that item ``index`` of the current epoch is augmented with."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> list[torch.Tensor] | EncodedViews | LevelViews | None:
        path = self.paths[index]
        generator = self.generator(index)
        aug = self.augmentation
        try:
            with quiet_large_images():
                if not self.plans:
                    image = open_rgb(path)
                elif self.on_device:  # the device decodes, crops and colours
                    encoded = read_image_bytes(path)
                    with Image.open(io.BytesIO(encoded)) as opened:
                        params = aug.plan(opened.size, generator)
                        data = read_for_device(encoded, opened)
                    sizes = tuple(spec.size for spec in aug.specs)
                    colour = ColourParams.from_views(params)
                    return EncodedViews(
                        data, view_boxes(params), colour, str(path), sizes, aug.mean, aug.std,
                        self.on_bad_image,
                    )  # fmt: skip
                else:
                    with Image.open(image_file(path)) as opened:
                        width = opened.width
                        params = aug.plan(opened.size, generator)  # parameters first: the size is enough
                        image = load_rgb(opened, aug.draft_factor(params))
        except DECODE_ERRORS as exc:
            if self.on_bad_image == "fail":
                raise BadImageError(f"cannot decode image {path}: {exc}") from exc
            if path not in self._reported:  # each once per process: the epoch summary counts them all
                self._reported.add(path)
                print(f"warning: skipped unreadable image {path}: {exc}", file=sys.stderr, flush=True)
            return None
        if not self.plans:
            try:
                crops = aug(image, generator)
            except DinoError:
                raise
            except Exception as exc:
                raise DinoError(f"{self.name} raised {type(exc).__name__} on {path}: {exc}") from exc
            return require_crops(crops, aug, self.name)
        crops = aug.crops(image, params, scale=image.width / width)
        if self.colour_on_device:  # the device colours them: a quarter to a third of the work here
            return LevelViews(crops, aug.mean, aug.std, ColourParams.from_views(params))
        if self.levels:
            return LevelViews(aug.colour(crops, params, normalized=False), aug.mean, aug.std)
        return aug.colour(crops, params)


def _colours_to_levels(augmentation: Augmentation) -> bool:
    """Whether ``augmentation.colour`` can stop before normalising (``normalized=False``)."""
    colour = getattr(augmentation, "colour", None)
    try:
        return colour is not None and "normalized" in inspect.signature(colour).parameters
    except (TypeError, ValueError):
        return False


def collate_multicrop(batch: Sequence[list[torch.Tensor] | EncodedViews | None]) -> MultiCropBatch:
    """Stack each view of the batch into ``[B, 3, h, w]``; ``None`` items are dropped and counted."""
    items = [item for item in batch if item is not None]
    n_skipped = len(batch) - len(items)
    if not items:
        return MultiCropBatch([], n_skipped)
    if isinstance(items[0], EncodedViews):
        return MultiCropBatch(EncodedBatch(items), n_skipped)
    if isinstance(items[0], LevelViews):
        return MultiCropBatch(LevelBatch(items), n_skipped)
    return MultiCropBatch([torch.stack(views) for views in zip(*items)], n_skipped)
