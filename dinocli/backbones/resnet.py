"""torchvision ResNets as backbones, classifier removed (as the reference implementation does).

For small images (training crops under 64 px, e.g. CIFAR's 32 px) the stem is the usual CIFAR
one: a 3x3 stride-1 convolution without max-pooling (``stem="small"``), so that a 32-px crop is
not reduced to 8x8 before the first block. Everything else, keys included, is torchvision's.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

import dinocli
from dinocli.errors import UsageError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEMS = ("imagenet", "small")
#: Crops smaller than this many pixels get the small stem unless ``stem`` is given.
SMALL_STEM_BELOW = 64


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning its pooled features ``[B, embed_dim]``.

    The state-dict keys are torchvision's without ``fc.*``, as in the reference's ResNet checkpoints.
    """

    patch_size = None
    supports_attention = False

    def __init__(self, arch: str, stem: str = "imagenet") -> None:
        super().__init__()
        if stem not in STEMS:
            raise UsageError(f"unknown ResNet stem {stem!r}; choose one of {', '.join(STEMS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "small":
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.stem = stem
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        # Keep torchvision's module names so that the keys match.
        for name, module in net.named_children():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def stem_for(img_size: int | None) -> str:
    """The stem for training crops of ``img_size`` pixels (ImageNet's when unknown)."""
    return "small" if img_size is not None and img_size < SMALL_STEM_BELOW else "imagenet"


def _factory(arch: str):
    def build(stem: str | None = None, img_size: int | None = None, **_: Any) -> ResNetBackbone:
        return ResNetBackbone(arch, stem or stem_for(img_size))

    return build


@dinocli.hookimpl
def dinocli_register_backbones(register) -> None:
    for arch in RESNETS:
        register(arch, _factory(arch), description=f"torchvision {arch}, classifier removed "
                 f"(3x3 stride-1 stem without max-pooling for crops under {SMALL_STEM_BELOW} px)")
