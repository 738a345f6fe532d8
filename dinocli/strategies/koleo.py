"""The KoLeo regulariser (Sablayrolles et al. 2019, as used by DINOv2).

For each global view, the student's backbone (CLS) embeddings of the batch are L2-normalised and
each one's distance to its nearest neighbour in that batch is measured; the loss is
``-mean(log(d + eps))``, which pushes embeddings apart and so spreads them over the sphere.
As DINOv2, the per-view losses are summed and multiplied by the weight (0.1). It adds a loss term
only (``provides_targets = False``): combine it with a target provider, e.g.
``--collapse centering,koleo``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import dinocli
from dinocli.interfaces import CollapseStrategy

EPS = 1e-8


def koleo_loss(embeddings: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows ``x_i`` of ``[B, D]``."""
    if embeddings.shape[0] < 2:
        raise ValueError("KoLeo needs at least two embeddings per view")
    x = F.normalize(embeddings.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
        nearest = dots.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


class KoLeo(CollapseStrategy):
    """Regulariser only: ``weight * sum over global views of koleo_loss(view's embeddings)``."""

    provides_targets = False

    def __init__(self, n_global: int = 2, weight: float = 0.1) -> None:
        super().__init__()
        self.n_global, self.weight = n_global, weight
        self._last: torch.Tensor | None = None

    def regularizer(
        self, student_embeddings: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor:
        views = student_embeddings.chunk(self.n_global)
        loss = self.weight * sum(koleo_loss(v) for v in views)
        self._last = loss.detach()
        return loss

    def metrics(self) -> dict[str, float]:
        return {} if self._last is None else {"koleo": float(self._last)}


def build(n_global: int = 2, koleo_weight: float = 0.1, **_: Any) -> KoLeo:
    return KoLeo(n_global, koleo_weight)


@dinocli.hookimpl
def dinocli_register_collapse_strategies(register) -> None:
    register("koleo", build, description="KoLeo regulariser, weight 0.1 (combine: centering,koleo)")
