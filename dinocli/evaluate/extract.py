"""Frozen features of labelled images, preprocessed as the reference evaluation does.

Preprocessing: resize the shorter side (bicubic by default), center crop, ImageNet mean and std.
Features: the backbone output (the CLS embedding after the final norm), or the reference's
linear-probe recipes: the CLS tokens of the last ``n_last_blocks`` blocks, concatenated, with
the mean patch token of the last block appended when ``avgpool_patch_tokens`` is set.

On a CUDA device (bicubic or bilinear resize), workers only read the files: JPEGs are decoded,
resized and centre-cropped on the device (:func:`dinocli.augmentations.device.eval_views`), equal
to the PIL preprocessing within a level or two on a few pixels (``decode_on_device`` chooses).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dinocli.data import ShardMember, list_labelled_images, open_rgb, quiet_large_images, read_image_bytes
from dinocli.data.shards import as_image
from dinocli.errors import DinoError, UsageError
from dinocli.evaluate.features_io import Features
from dinocli.interfaces import require_embeddings
from dinocli.runtime import autocast, resolve_device, resolve_precision, usable_cpus

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
    "lanczos": transforms.InterpolationMode.LANCZOS,
}


def eval_transform(
    resize: int = 256, crop_size: int = 224, interpolation: str = "bicubic"
) -> Callable[[Any], torch.Tensor]:
    """PIL RGB image -> normalised tensor ``[3, crop_size, crop_size]``, as the reference evaluates."""
    if crop_size < 1:
        raise UsageError(f"--crop-size must be positive, got {crop_size}")
    if resize < crop_size:
        raise UsageError(f"--resize ({resize}) must be at least --crop-size ({crop_size})")
    if interpolation not in INTERPOLATIONS:
        raise UsageError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=INTERPOLATIONS[interpolation]),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def matched_eval_size(crop_size: int, crops_scale: Sequence[float], multiple: int = 1) -> int:
    """The test resolution at which objects look as large as in random-resized training crops.

    A crop of a fraction ``s`` of the image's area, resized to ``crop_size`` pixels, magnifies the
    image ``1 / sqrt(s)`` times; over ``s`` uniform in ``crops_scale`` that is ``2 (sqrt(b) -
    sqrt(a)) / (b - a)`` on average, so a whole test image is best resized to ``crop_size`` times
    that (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"): 40 px for 32-px
    crops of 35-100 %. Rounded to a ``multiple`` (a ViT's patch size).
    """
    low, high = (float(v) for v in crops_scale)
    if not 0 < low <= high <= 1:
        raise UsageError(f"crop scales must satisfy 0 < min <= max <= 1, got {low} {high}")
    magnification = 1 / high**0.5 if low == high else 2 * (high**0.5 - low**0.5) / (high - low)
    return max(multiple, multiple * round(crop_size * magnification / multiple))


def reference_resize(crop_size: int) -> int:
    """The resize before a ``crop_size`` centre crop in the reference's evaluation: 256 before 224,
    the same ratio at other sizes (37 before 32)."""
    return max(crop_size, math.ceil(crop_size * 256 / 224))


def check_options(
    resize: int, crop_size: int, interpolation: str, batch_size: int, num_workers: int
) -> Callable[[Any], torch.Tensor]:
    """Validate the extraction options (a clear error for each); returns the transform."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {num_workers}")
    return eval_transform(resize, crop_size, interpolation)


def embed(
    model: nn.Module, x: torch.Tensor, n_last_blocks: int = 1, avgpool_patch_tokens: bool = False
) -> torch.Tensor:
    """Features ``[B, D']`` of a preprocessed batch ``x`` (see the module docstring)."""
    if n_last_blocks == 1 and not avgpool_patch_tokens:
        return require_embeddings(model(x), x, model, f"backbone {type(model).__name__}")
    if not hasattr(model, "get_intermediate_layers"):
        raise UsageError(
            f"{type(model).__name__} has no token outputs: --n-last-blocks and "
            "--avgpool-patch-tokens need a ViT backbone"
        )
    outputs = model.get_intermediate_layers(x, n_last_blocks)
    parts = [tokens[:, 0] for tokens in outputs]
    if avgpool_patch_tokens:
        parts.append(outputs[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


class _Images(Dataset):
    """Decoded, preprocessed images; a failure comes back as a message, not an exception."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            with quiet_large_images():
                return self.transform(open_rgb(self.paths[i]))
        except Exception as exc:  # noqa: BLE001 - reported by the main process as one line
            return f"cannot read image {self.paths[i]}: {exc}"


class _Encoded(_Images):
    """Encoded JPEG bytes (or decoded pixels of other files) for decoding on the device."""

    def __getitem__(self, i: int) -> torch.Tensor | str:
        from PIL import Image

        from dinocli.augmentations.device import read_for_device

        try:
            data = read_image_bytes(self.paths[i])
            with quiet_large_images(), Image.open(io.BytesIO(data)) as opened:
                return read_for_device(data, opened)
        except Exception as exc:  # noqa: BLE001 - reported by the main process as one line
            return f"cannot read image {self.paths[i]}: {exc}"


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | list[torch.Tensor] | str:
    for item in items:
        if isinstance(item, str):
            return item
    if items[0].dim() != 3 or any(x.shape != items[0].shape for x in items):
        return items  # encoded files: a list, decoded on the device
    return torch.stack(items)


def _device_batch(
    items: torch.Tensor | list[torch.Tensor], paths: Sequence[Path], resize: int, crop: int,
    interpolation: str, dev: torch.device,
) -> torch.Tensor:  # fmt: skip
    """The preprocessed batch of :class:`_Encoded` items, made on ``dev``."""
    from dinocli.augmentations.device import UndecodableImage, eval_views

    try:
        return eval_views(list(items), resize, crop, IMAGENET_MEAN, IMAGENET_STD, dev, interpolation)
    except UndecodableImage as exc:
        raise UsageError(f"cannot read image {paths[exc.index]}: not a decodable JPEG") from exc


def _batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    for batch in loader:
        if isinstance(batch, str):
            raise UsageError(batch)
        yield batch


@torch.no_grad()
def extract_features(
    model: nn.Module,
    paths: Sequence[str | Path],
    labels: Sequence[int] | torch.Tensor | None = None,
    *,
    classes: Sequence[str] = (),
    root: str | Path | None = None,
    resize: int = 256,
    crop_size: int = 224,
    interpolation: str = "bicubic",
    n_last_blocks: int = 1,
    avgpool_patch_tokens: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    decode_on_device: bool | None = None,
) -> Features:
    """Features of the images ``paths`` (float32 ``[N, D]``, in the order given).

    ``labels`` defaults to -1 (unlabelled). ``device=None`` runs where the model already is;
    the model's train/eval mode is restored afterwards, so a training loop can call this on its
    teacher. ``progress`` is called with the number of images done after each batch.
    ``decode_on_device``: decode, resize and crop on the device (default: on CUDA with a bicubic
    or bilinear resize); workers then only read files. A batch's features are copied back once
    the next batch is queued, so the device does not wait for the host in between.
    """
    paths = [as_image(p) for p in paths]
    if not paths:
        raise UsageError("no images to extract features from")
    labels_t = (
        torch.full((len(paths),), -1, dtype=torch.int64)
        if labels is None
        else torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    )
    if labels_t.shape[0] != len(paths):
        raise UsageError(f"{len(paths)} images but {labels_t.shape[0]} labels")
    transform = check_options(resize, crop_size, interpolation, batch_size, num_workers)
    depth = len(getattr(model, "blocks", ())) or None
    if n_last_blocks < 1 or (depth is not None and n_last_blocks > depth):
        limit = f" (the backbone has {depth} blocks)" if depth else ""
        raise UsageError(f"--n-last-blocks must be between 1 and the depth{limit}, got {n_last_blocks}")
    dev = resolve_device(device) if device is not None else _model_device(model)
    precision = resolve_precision(precision, dev)
    if decode_on_device is None:
        decode_on_device = dev.type == "cuda" and interpolation in ("bicubic", "bilinear")
    elif decode_on_device and interpolation not in ("bicubic", "bilinear"):
        raise UsageError(f"decoding on the device resizes bicubic or bilinear, not {interpolation}")
    loader = DataLoader(
        (_Encoded if decode_on_device else _Images)(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    was_training = model.training
    model.eval()
    if device is not None:
        model.to(dev)
    out: torch.Tensor | None = None
    done = 0
    queued: tuple[torch.Tensor, int] | None = None  # the previous batch's features, maybe not ready

    def store(feats: torch.Tensor, first: int) -> None:
        nonlocal out
        feats = feats.float().cpu()
        if not torch.isfinite(feats).all():
            raise DinoError(
                f"the backbone produced NaN or infinite features (images {first} to "
                f"{first + len(feats) - 1}); try --precision fp32"
            )
        if out is None:
            out = torch.empty(len(paths), feats.shape[1], dtype=torch.float32)
        out[first : first + len(feats)] = feats
        if progress is not None:
            progress(len(feats))

    try:
        for batch in _batches(loader):
            if decode_on_device:
                batch = _device_batch(batch, paths[done:], resize, crop_size, interpolation, dev)
            with autocast(precision, dev):
                feats = embed(model, batch.to(dev, non_blocking=True), n_last_blocks, avgpool_patch_tokens)
            if queued is not None:  # read once this batch is queued: the device is never idle waiting
                store(*queued)
            queued = (feats, done)
            done += len(batch)
        if queued is not None:
            store(*queued)
    finally:
        model.train(was_training)
    assert out is not None
    rel = [_relative(p, root) for p in paths]
    meta = {
        "preprocessing": {
            "resize": resize,
            "crop_size": crop_size,
            "interpolation": interpolation,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "n_last_blocks": n_last_blocks,
        "avgpool_patch_tokens": avgpool_patch_tokens,
        "precision": precision,
    }
    if root is not None:  # which images: two files of the same ones are no train/val pair
        meta["data"] = str(Path(root).resolve()) if Path(root).exists() else str(root)
    return Features(out, labels_t, list(classes), rel, meta)


def extract_folder(model: nn.Module, root: str | Path, **options: Any) -> Features:
    """:func:`extract_features` of every image under ``root`` (ImageFolder labels, or -1), or of
    the tar shards ``root`` names (see :mod:`dinocli.data.shards`)."""
    paths, labels, classes = list_labelled_images(root)
    return extract_features(model, paths, labels, classes=classes, root=root, **options)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (of a Hugging Face folder: its weights file)."""
    from dinocli.export.huggingface import WEIGHTS

    path = Path(path)
    digest = hashlib.sha256()
    with open(path / WEIGHTS if path.is_dir() else path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_num_workers() -> int:
    """Data-loading workers: up to 8, leaving one core to the main process."""
    return max(0, min(8, usable_cpus() - 1))


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _relative(path: Path | ShardMember, root: str | Path | None) -> str:
    if isinstance(path, ShardMember):
        return path.name  # the member: the path in the folder the shard was written from
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def backbone_for_eval(
    weights: str | Path | None = None,
    *,
    checkpoint_key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    random_init: bool = False,
    raw_pixels: bool = False,
    img_size: int = 224,
    seed: int = 0,
    patch_embed: str | None = None,
    pool: str | None = None,
    depth: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone to evaluate and what describes it (for the features file).

    From ``weights``; or randomly initialised (``random_init``, needs ``arch``; ``patch_embed``,
    ``pool`` and ``depth`` pick a ViT's patch embedding, output and blocks, as in training); or no
    network at all (``raw_pixels``: the flattened preprocessed crop, the baseline learned features
    must beat).
    """
    from dinocli.registry import create_backbone
    from dinocli.weights import build_backbone, read_backbone_weights, resolve_backbone_spec, state_dict_sha256

    if checkpoint_key not in ("teacher", "student"):
        raise UsageError(f"--checkpoint-key must be teacher or student, got {checkpoint_key!r}")
    for option, value in (("--patch-embed", patch_embed), ("--pool", pool), ("--depth", depth)):
        if value is not None and not random_init:
            raise UsageError(f"{option} applies to --random-init (a weights file names its own)")
    if raw_pixels:
        if weights is not None or random_init or arch is not None:
            raise UsageError("--raw-pixels uses no network: drop --weights, --random-init and --arch")
        return nn.Flatten(), {"backbone": {"name": "raw_pixels", "kwargs": {}}, "weights": None}
    if random_init:
        if weights is not None:
            raise UsageError("give either --weights or --random-init, not both")
        if arch is None:
            raise UsageError("--random-init needs --arch (e.g. --arch vit_small)")
        kwargs: dict[str, Any] = {"img_size": img_size}
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if patch_embed is not None:
            kwargs["patch_embed"] = patch_embed
        if pool is not None:
            kwargs["pool"] = pool
        if depth:
            kwargs["depth"] = depth
        torch.manual_seed(seed)
        model = create_backbone(arch, **kwargs).eval()
        return model, {"backbone": {"name": arch, "kwargs": kwargs}, "weights": None, "seed": seed}
    if weights is None:
        raise UsageError("give --weights (a checkpoint or exported backbone), or --random-init --arch NAME")
    loaded = read_backbone_weights(weights, checkpoint_key)
    spec = resolve_backbone_spec(loaded, arch, patch_size)
    model = build_backbone(loaded, arch, patch_size).eval()
    info = {
        "backbone": spec,
        "weights": Path(weights).name,
        "weights_sha256": file_sha256(weights),
        "backbone_sha256": state_dict_sha256(loaded.state_dict),
        "checkpoint_key": checkpoint_key,
    }
    return model, info
