"""``example_cnn``: a small convolutional backbone, the simplest honest :class:`dinocli.Backbone`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinocli.errors import UsageError


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ExampleCNN(nn.Module):
    """Three stride-2 conv blocks and global average pooling: ``[B, 3, H, W] -> [B, embed_dim]``.

    Any input size works (the pooling is global). A CNN has no patches and no attention maps.
    """

    patch_size = None
    supports_attention = False

    def __init__(self, embed_dim: int = 128, width: int = 32) -> None:
        super().__init__()
        if embed_dim < 1 or width < 1:
            raise UsageError(f"embed_dim and width must be positive, got {embed_dim} and {width}")
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            _conv_bn_relu(3, width),
            _conv_bn_relu(width, 2 * width),
            _conv_bn_relu(2 * width, embed_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_example_cnn(embed_dim: int = 128, width: int = 32, **_: Any) -> ExampleCNN:
    """Factory: dinocli also passes ``patch_size``, ``drop_path_rate`` and ``img_size``, unused here."""
    return ExampleCNN(embed_dim=embed_dim, width=width)
