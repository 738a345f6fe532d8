"""dino-example: a template dinocli plugin.

dinocli finds this module through the entry point ``example = "dino_example"`` in the group
``dinocli`` (see ``pyproject.toml``) and calls the three hook implementations below. Each one
registers a factory under a name; dinocli calls the factory with keyword arguments when a user
picks that name (``--arch example_cnn``, ``--augmentation example_simple``, ``--collapse centering,me-max``).
"""

from __future__ import annotations

import dinocli

from dino_example.augmentation import build_example_simple
from dino_example.backbone import build_example_cnn
from dino_example.strategy import build_me_max

__version__ = "0.1.0"


@dinocli.hookimpl
def dinocli_register_backbones(register) -> None:
    register("example_cnn", build_example_cnn, description="small 3-layer CNN (example plugin)")


@dinocli.hookimpl
def dinocli_register_augmentations(register) -> None:
    register(
        "example_simple",
        build_example_simple,
        description="random resized crops + flips, no colour jitter (example plugin)",
    )


@dinocli.hookimpl
def dinocli_register_collapse_strategies(register) -> None:
    register("me-max", build_me_max, description="mean-entropy maximisation regulariser (MSN)")
