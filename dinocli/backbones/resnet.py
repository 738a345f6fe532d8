"""torchvision ResNets as backbones, classifier removed (as the reference implementation does)."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

import dinocli

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning its pooled features ``[B, embed_dim]``.

    The state-dict keys are torchvision's without ``fc.*``, as in the reference's ResNet checkpoints.
    """

    patch_size = None
    supports_attention = False

    def __init__(self, arch: str) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        # Keep torchvision's module names so that the keys match.
        for name, module in net.named_children():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _factory(arch: str):
    def build(**_: Any) -> ResNetBackbone:
        return ResNetBackbone(arch)

    return build


@dinocli.hookimpl
def dinocli_register_backbones(register) -> None:
    for arch in RESNETS:
        register(arch, _factory(arch), description=f"torchvision {arch}, classifier removed")
