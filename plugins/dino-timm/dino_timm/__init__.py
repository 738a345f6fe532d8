"""dinocli plugin: every timm model as a backbone, named ``timm/<model>``.

Registered as the pattern ``timm/*``: timm is imported only when a ``timm/...`` name is looked
up, completed or counted, never when dinocli starts or ``dino plugins`` lists the pattern.
"""

from __future__ import annotations

from typing import Any

import dinocli

PATTERN = "timm/*"


def model_names() -> list[str]:
    """Every architecture timm can build (``timm.list_models()``, without pretrained tags)."""
    import timm

    return timm.list_models()


def build(model_name: str, **kwargs: Any):
    """The timm model ``model_name`` with random weights as a :class:`dino_timm.backbone.TimmBackbone`."""
    from dino_timm.backbone import create

    return create(model_name, **kwargs)


@dinocli.hookimpl
def dinocli_register_backbones(register) -> None:
    register(
        PATTERN,
        build,
        description="any timm model, random weights, classifier removed (dynamic image size for ViTs)",
        names=model_names,
    )
