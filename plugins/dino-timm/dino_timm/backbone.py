"""A timm model as a dinocli backbone: pooled features, embedding size, patch size, attention.

The model is built with ``pretrained=False`` (nothing is downloaded) and ``num_classes=0``, so its
forward pass returns the pooled features timm's classifier would see. Its state-dict keys are
timm's under ``model.``. ViTs get ``dynamic_img_size=True``: their position embeddings are
resampled by timm for every crop size (bicubic, without the reference's 0.1 offset), so global
and local crops of any size go through the same network.
"""

from __future__ import annotations

import re
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

class TimmBackbone(nn.Module):
    """``forward(x) -> [B, embed_dim]`` of a timm model built without a classifier.

    ``patch_size`` is the patch embedding's (``None`` for CNNs). ``supports_attention`` holds for
    timm's plain pre-norm ViTs with at least one prefix (class or register) token, whose last
    block's attention :meth:`get_last_selfattention` computes explicitly (timm's fused attention
    does not return it).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.patch_size = _patch_size(model)
        self.supports_attention = has_plain_attention(model)
        self.num_heads = model.blocks[-1].attn.num_heads if self.supports_attention else None
        # What attn-maps shows: the CLS row for token pooling, the mean patch row otherwise.
        token_pool = getattr(model, "global_pool", None) == "token"
        self.pool = "cls" if token_pool and getattr(model, "has_class_token", False) else "avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._whole_patches(x))

    def _whole_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cropped at the bottom and right to whole patches, as a patch convolution drops the
        remainder (timm refuses such inputs), so 96-px local crops fit 14-px patches."""
        if self.patch_size is None:
            return x
        h, w = x.shape[-2], x.shape[-1]
        return x[..., : h - h % self.patch_size, : w - w % self.patch_size]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention ``[B, heads, 1 + N, 1 + N]``: the first prefix token (CLS)
        and the ``N`` patch tokens; other prefix tokens (registers, distillation) are left out."""
        if not self.supports_attention:
            raise TypeError(f"{type(self.model).__name__} has no plain self-attention to return")
        vit = self.model
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(self._whole_patches(x)))))
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        probs = attention_probs(last.attn, last.norm1(x))
        prefix = vit.num_prefix_tokens
        if prefix > 1:
            keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(prefix, probs.shape[-1])])
            keep = keep.to(probs.device)
            probs = probs.index_select(2, keep).index_select(3, keep)
        return probs


def attention_probs(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q_norm(q) k_norm(k)^T * scale)`` of a timm :class:`~timm.layers.Attention` on
    tokens ``x [B, T, C]`` (the block's normed input): ``[B, heads, T, T]``."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def has_plain_attention(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT whose last block is a pre-norm :class:`Block` with a plain
    :class:`Attention` (no rotary embeddings, no fused parallel block) and that has a prefix token."""
    if not isinstance(model, VisionTransformer) or model.num_prefix_tokens < 1 or not len(model.blocks):
        return False
    last = model.blocks[-1]
    return type(last) is Block and type(last.attn) is Attention


def _patch_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, (tuple, list)) and len(set(size)) == 1:
        size = size[0]
    return int(size) if isinstance(size, int) else None


def create(
    model_name: str,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    depth: int | None = None,
    **_: Any,
) -> TimmBackbone:
    """``timm.create_model(model_name)`` with random weights, no classifier and, where the model
    takes them, the training crop size, the stochastic-depth rate, ``depth`` (when given) and
    ``dynamic_img_size=True``. Other dinocli arguments (``patch_size``, ``patch_embed``, ``pool``,
    ``stem``) are ignored: the timm name fixes them."""
    wanted: dict[str, Any] = {"dynamic_img_size": True, "drop_path_rate": drop_path_rate}
    if img_size:
        wanted["img_size"] = int(img_size)
    if depth:
        wanted["depth"] = int(depth)
    while True:
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **wanted)
            break
        except TypeError as exc:  # a constructor without one of the optional arguments: drop it
            found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if not found or found.group(1) not in wanted:
                raise
            del wanted[found.group(1)]
    return TimmBackbone(model)
