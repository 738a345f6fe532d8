"""Last-block CLS self-attention of a ViT: preprocessing, per-head maps and mass-threshold masks.

The numerics follow the reference ``visualize_attention.py`` of the DINO paper: the image is
resized, normalised with the ImageNet statistics and cropped (top-left) to a multiple of the patch
size; the map of head ``j`` is row 0 (the CLS token) of the last block's softmax attention, without
its CLS column, reshaped to the patch grid (for a ViT whose embedding is the mean patch token, the
patch rows averaged instead). A mask keeps the smallest set of patches holding at
least a fraction ``T`` of the head's attention mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from dinocli.errors import UsageError
from dinocli.weights import load_backbone, read_backbone_weights, resolve_backbone_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass
class ImageAttention:
    """One image's attention: the photo the model saw and its raw maps at patch resolution."""

    name: str
    photo: Image.Image  # resized and cropped RGB, exactly the pixels the model saw
    maps: torch.Tensor  # [heads, h, w] float32, query-to-patch attention of the selected heads
    heads: list[int]  # the model's head index of each map
    patch_size: int
    query: str = "CLS"  # whose attention the maps show (see attention_query)


def resolve_size(image_size: Sequence[int], keep_aspect: bool = False) -> int | tuple[int, int]:
    """The resize target: ``(n, n)`` for one number, ``(H, W)`` for two, the short side with ``keep_aspect``."""
    sizes = [int(s) for s in image_size]
    if not sizes or len(sizes) > 2 or any(s <= 0 for s in sizes):
        raise UsageError(
            f"--image-size takes one positive number (square) or two (H W), got {' '.join(map(str, sizes)) or 'nothing'}"
        )
    if keep_aspect:
        if len(sizes) != 1:
            raise UsageError("--keep-aspect takes one --image-size (the short side), not two")
        return sizes[0]
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def preprocess(
    image: Image.Image, size: int | tuple[int, int], patch_size: int
) -> tuple[torch.Tensor, Image.Image]:
    """The normalised tensor ``[3, H, W]`` the model sees, and the same pixels as an RGB photo.

    ``size`` as torchvision's ``Resize``: ``(H, W)`` exactly, or an int for the short side. The
    result is cropped at the top-left corner to a multiple of ``patch_size``, as the reference does.
    """
    resized = TF.resize(image.convert("RGB"), size if isinstance(size, int) else list(size))
    width, height = resized.size
    H, W = height - height % patch_size, width - width % patch_size
    if H == 0 or W == 0:
        raise UsageError(
            f"the image resized to {width}x{height} is smaller than one {patch_size}-pixel patch; "
            "use a larger --image-size"
        )
    photo = resized.crop((0, 0, W, H))
    tensor = TF.normalize(TF.to_tensor(photo), IMAGENET_MEAN, IMAGENET_STD)
    return tensor, photo


def cls_attention(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CLS-to-patch rows ``[B, heads, h, w]`` of an attention tensor ``[B, heads, 1+N, 1+N]``."""
    return _to_patches(attention, grid)[:, :, 0].unflatten(-1, grid)


def mean_patch_attention(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch-to-patch attention averaged over the patch queries ``[B, heads, h, w]``: what the mean
    patch token (a ViT with ``pool="avg"``) attends to, as the CLS row is for the CLS token."""
    return _to_patches(attention, grid)[:, :, 1:].mean(dim=2).unflatten(-1, grid)


def _to_patches(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The columns of the patch tokens ``[B, heads, 1+N, N]``, checked against the ``h x w`` grid."""
    tokens = attention.shape[2]
    if tokens != 1 + grid[0] * grid[1]:
        raise ValueError(f"attention over {tokens} tokens does not fit a {grid[0]}x{grid[1]} patch grid")
    return attention[..., 1:]


def attention_query(model: nn.Module) -> str:
    """Whose attention :func:`attention_maps` shows: ``"CLS"``, or ``"mean patch"`` for a ViT whose
    embedding is the mean patch token (``pool="avg"``)."""
    return "mean patch" if getattr(model, "pool", "cls") == "avg" else "CLS"


def select_heads(num_heads: int, heads: Sequence[int] | None) -> list[int]:
    """The head indices to show (all by default), checked against the model's ``num_heads``."""
    if heads is None:
        return list(range(num_heads))
    chosen = list(dict.fromkeys(int(j) for j in heads))
    bad = [j for j in chosen if not 0 <= j < num_heads]
    if bad or not chosen:
        raise UsageError(
            f"--heads {','.join(map(str, heads))}: the model has {num_heads} heads, numbered 0 to {num_heads - 1}"
        )
    return chosen


def require_attention(model: nn.Module, name: str | None = None) -> None:
    """Raise a clear error when ``model`` cannot give its self-attention."""
    if _has_attention(model):
        return
    what = f"backbone {name!r}" if name else f"the backbone ({type(model).__name__})"
    raise UsageError(
        f"{what} has no self-attention to show; attention maps need a vision transformer "
        "(e.g. vit_small)"
    )


@torch.inference_mode()
def attention_maps(
    model: nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    heads: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Raw CLS-to-patch attention ``[heads, h, w]`` (float32, CPU) of each normalised image ``[3, H, W]``;
    for a ViT whose output is the mean patch token (``pool="avg"``), the attention of the patch
    queries averaged (:func:`mean_patch_attention`).

    Images of the same size run as one batch. ``H`` and ``W`` must be multiples of the patch size.
    The model runs in eval mode (its previous mode is restored).
    """
    require_attention(model)
    patch = int(model.patch_size)
    batch = list(images) if not isinstance(images, torch.Tensor) or images.ndim == 4 else [images]
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(batch)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(batch):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected an image tensor [3, H, W], got {list(img.shape)}")
        if img.shape[1] % patch or img.shape[2] % patch:
            raise ValueError(f"image size {list(img.shape[1:])} is not a multiple of patch {patch}")
        groups.setdefault((img.shape[1], img.shape[2]), []).append(i)
    rows = mean_patch_attention if attention_query(model) == "mean patch" else cls_attention
    was_training = model.training
    model.eval()  # no stochastic depth
    try:
        for (H, W), members in groups.items():
            x = torch.stack([batch[i] for i in members]).to(device)
            attention = model.get_last_selfattention(x)
            chosen = select_heads(attention.shape[1], heads)
            maps = rows(attention, (H // patch, W // patch))[:, chosen]
            for i, m in zip(members, maps):
                out[i] = m.float().cpu()
    finally:
        model.train(was_training)
    return [m for m in out if m is not None]


def attention_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean masks (same shape as ``maps`` ``[heads, ...]``): per head, the smallest set of patches
    holding at least ``threshold`` of its attention mass.

    The reference's cumulative-sum definition: sort a head's values ascending, normalise them to sum
    to 1 and keep the patches whose cumulative sum exceeds ``1 - threshold``, i.e. the largest values
    once the smallest ones holding at most ``1 - threshold`` of the mass are dropped.
    """
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    flat = maps.reshape(maps.shape[0], -1).double()
    values, order = torch.sort(flat, dim=1)
    values = values / values.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(values, dim=1) > 1.0 - threshold
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(maps.shape)


def upsample(maps: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """Maps ``[heads, h, w]`` enlarged ``factor`` times (``nearest`` as the reference, or ``bilinear``)."""
    if mode not in UPSAMPLE_MODES:
        raise UsageError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[None].float(), scale_factor=factor, mode=mode, **kwargs)[0]


def load_attention_backbone(
    path: str | Path,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
) -> nn.Module:
    """:func:`dinocli.load_backbone`, refused with an error naming the backbone when it has no attention."""
    model = load_backbone(path, arch, patch_size, checkpoint_key)
    if not _has_attention(model):
        weights = read_backbone_weights(path, checkpoint_key)
        require_attention(model, resolve_backbone_spec(weights, arch, patch_size)["name"])
    return model


def _has_attention(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_attention", False)) and callable(
        getattr(model, "get_last_selfattention", None)
    )
