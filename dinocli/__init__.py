"""dinocli: DINO self-supervised learning of vision transformers.

Public API::

    import dinocli
    dinocli.list_backbones()                  # names from every installed plugin
    model = dinocli.create_backbone("vit_small", patch_size=16)
    model = dinocli.load_backbone("dino_deitsmall16_pretrain.pth")
"""

from __future__ import annotations

from importlib import metadata

from dinocli.hookspecs import hookimpl

try:
    __version__ = metadata.version("dinocli")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from dinocli.errors import DinoError, UsageError  # noqa: E402
from dinocli.interfaces import Augmentation, Backbone, CollapseStrategy, Logger  # noqa: E402
from dinocli.registry import (  # noqa: E402
    create_augmentation,
    create_backbone,
    create_collapse_strategy,
    get_registry,
    list_augmentations,
    list_backbones,
    list_collapse_strategies,
    list_loggers,
    list_recipes,
)
from dinocli.weights import load_backbone  # noqa: E402

__all__ = [
    "Augmentation",
    "Backbone",
    "CollapseStrategy",
    "DinoError",
    "Logger",
    "UsageError",
    "__version__",
    "create_augmentation",
    "create_backbone",
    "create_collapse_strategy",
    "get_registry",
    "hookimpl",
    "list_augmentations",
    "list_backbones",
    "list_collapse_strategies",
    "list_loggers",
    "list_recipes",
    "load_backbone",
]
