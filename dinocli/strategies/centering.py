"""Centering + sharpening (Caron et al. 2021, Sec. 3.1): the DINO paper's collapse avoidance.

Teacher targets are ``softmax((t - c) / tau_t)``; the center ``c`` is an EMA of the batch mean of
teacher logits, over all processes: ``c <- m c + (1 - m) mean(t)`` (``m = 0.9``), updated after the
loss, exactly as the reference implementation's ``DINOLoss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import dinocli
from dinocli.distributed import all_reduce_sum, world_size
from dinocli.interfaces import CollapseStrategy


class Centering(CollapseStrategy):
    """Centering of the teacher logits by an EMA center, sharpening by a low temperature."""

    provides_targets = True

    def __init__(self, out_dim: int, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.softmax((teacher_logits - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        batch_center = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_logits) * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    def metrics(self) -> dict[str, float]:
        return {"center_norm": float(self.center.norm())}


def build(out_dim: int = 65536, center_momentum: float = 0.9, **_: Any) -> Centering:
    return Centering(out_dim, center_momentum)


@dinocli.hookimpl
def dinocli_register_collapse_strategies(register) -> None:
    register("centering", build, description="centering + sharpening (DINO paper)")
