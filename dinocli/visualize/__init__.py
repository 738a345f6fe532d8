"""Looking inside a trained ViT: last-block self-attention maps, masks and the pictures of them.

Python API (also used by ``dino demo``)::

    from dinocli.visualize import attention_maps, load_attention_backbone, write_attention_report
    model = load_attention_backbone("run/checkpoint.pth")
    maps = attention_maps(model, [tensor])          # [heads, h, w] per normalised image
    write_attention_report(model, ["cat.jpg"], "out", threshold=0.6)
"""

from __future__ import annotations

from dinocli.visualize.attention import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageAttention,
    attention_mask,
    attention_maps,
    attention_query,
    cls_attention,
    load_attention_backbone,
    mean_patch_attention,
    preprocess,
    require_attention,
    resolve_size,
    select_heads,
    upsample,
)
from dinocli.visualize.colormaps import COLORMAPS, apply_colormap, lookup_table
from dinocli.visualize.report import (
    AttentionReport,
    ImageReport,
    write_attention_report,
    write_image_report,
)

__all__ = [
    "COLORMAPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AttentionReport",
    "ImageAttention",
    "ImageReport",
    "apply_colormap",
    "attention_mask",
    "attention_maps",
    "attention_query",
    "cls_attention",
    "load_attention_backbone",
    "lookup_table",
    "mean_patch_attention",
    "preprocess",
    "require_attention",
    "resolve_size",
    "select_heads",
    "upsample",
    "write_attention_report",
    "write_image_report",
]
