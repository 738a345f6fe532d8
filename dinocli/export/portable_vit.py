"""A dinocli ViT whose graph has no Python branches on the input size, for tracing exporters (ONNX).

The reference ViT resizes its position embeddings with bicubic interpolation only when the input
grid differs from the training grid. A traced graph freezes that ``if``, so an ONNX file traced
at one size fails at another. :class:`PortableViT` writes the same resize as two small matrix
products whose weights are computed from the input's shape inside the graph (PyTorch's bicubic
kernel: ``align_corners=False``, ``A = -0.75``, clamped borders, the reference's ``+0.1`` scale),
and selects the identity when the reference would skip the resize, so one graph serves every
batch and image size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dinocli.backbones.vit import pool_tokens

_CUBIC_A = -0.75


def _cubic_near(x: torch.Tensor) -> torch.Tensor:
    """Cubic convolution weight for ``|x| <= 1``."""
    a = _CUBIC_A
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:
    """Cubic convolution weight for ``1 < |x| < 2``."""
    a = _CUBIC_A
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_resize_matrix(ones: torch.Tensor, grid: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``[n_out, n_in]`` weights of the reference's bicubic resize along one axis.

    ``ones`` is a float32 vector of ``n_out`` ones (taken from the input so that its length is
    traced), ``grid`` is ``arange(n_in)`` (float32), ``identity`` a 0-d bool: when true the
    matrix is the identity (the reference keeps its position embeddings unchanged).
    """
    n_in = grid.shape[0]
    n_out = ones.sum()
    dst = torch.cumsum(ones, 0) - 1
    # F.interpolate(scale_factor=(n_out + 0.1) / n_in): source = (dst + 0.5) / scale - 0.5.
    src = (dst + 0.5) * (n_in / (n_out + 0.1)) - 0.5
    floor = torch.floor(src)
    t = src - floor
    weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    matrix = torch.zeros_like(dst.unsqueeze(1) * grid.unsqueeze(0))
    for k, w in enumerate(weights):
        index = torch.clamp(floor + (k - 1), 0, n_in - 1)
        matrix = matrix + w.unsqueeze(1) * (index.unsqueeze(1) == grid.unsqueeze(0)).to(ones.dtype)
    eye = (dst.unsqueeze(1) == grid.unsqueeze(0)).to(ones.dtype)
    return torch.where(identity, eye, matrix)


class PortableViT(nn.Module):
    """The embedding of a dinocli :class:`~dinocli.backbones.vit.VisionTransformer`, traceable.

    Shares the ViT's parameters; ``forward(x: [B, 3, H, W]) -> [B, embed_dim]`` equals the ViT's
    for every ``B``, ``H`` and ``W`` (to float rounding of the resized position embeddings).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.pool = vit.pool
        self.num_patches = vit.pos_embed.shape[1] - 1
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"{self.num_patches} position embeddings do not form a square grid")
        self.register_buffer("grid", torch.arange(side, dtype=torch.float32), persistent=False)

    def _position_embeddings(self, x: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        side = self.grid.shape[0]
        dim = self.pos_embed.shape[-1]
        rows = torch.ones_like(patches[0, 0, :, 0], dtype=torch.float32)
        cols = torch.ones_like(patches[0, 0, 0, :], dtype=torch.float32)
        height = torch.ones_like(x[0, 0, :, 0], dtype=torch.float32).sum()
        width = torch.ones_like(x[0, 0, 0, :], dtype=torch.float32).sum()
        # The reference skips the resize when the grid has as many patches and the input is square.
        same = (rows.sum() * cols.sum() == self.num_patches) & (height == width)
        resize_rows = bicubic_resize_matrix(rows, self.grid, same)
        resize_cols = bicubic_resize_matrix(cols, self.grid, same)
        table = self.pos_embed[0, 1:].float().reshape(side, side * dim)
        table = (resize_rows @ table).reshape(-1, side, dim).transpose(0, 1).reshape(side, -1)
        table = (resize_cols @ table).reshape(-1, rows.shape[0], dim).transpose(0, 1)
        patch_pos = table.reshape(1, -1, dim).to(self.pos_embed.dtype)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.grid(x)
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self._position_embeddings(x, patches)
        for block in self.blocks:
            tokens = block(tokens)
        return pool_tokens(self.norm(tokens), self.pool)
