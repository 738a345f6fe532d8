"""Looking inside a trained ViT: last-block self-attention maps, masks and the pictures of them.

Python API (also used by ``dino demo``)::

    from dinocli.visualize import attention_maps, load_attention_backbone, write_attention_pages
    model = load_attention_backbone("run/checkpoint.pth")
    maps = attention_maps(model, [tensor])          # [heads, h, w] per normalised image
    write_attention_pages(model, ["cat.jpg"], "out", threshold=0.6)
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
from dinocli.visualize.attention_pages import (
    AttentionPages,
    ImagePage,
    write_attention_pages,
    write_image_page,
)

__all__ = [
    "COLORMAPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AttentionPages",
    "ImageAttention",
    "ImagePage",
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
    "write_attention_pages",
    "write_image_page",
]
