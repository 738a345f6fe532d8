"""No collapse avoidance: teacher targets are ``softmax(t / tau_t)``, nothing else.

Useful to show collapse happening (and to test that the other strategies prevent it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import dinocli
from dinocli.interfaces import CollapseStrategy


class NoCollapseAvoidance(CollapseStrategy):
    """Sharpening only: the teacher's softmax at its temperature, no centering, no state."""

    provides_targets = True

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.softmax(teacher_logits / temperature, dim=-1)


def build(**_: Any) -> NoCollapseAvoidance:
    return NoCollapseAvoidance()


@dinocli.hookimpl
def dinocli_register_collapse_strategies(register) -> None:
    register("none", build, description="no collapse avoidance (to show collapse)")
