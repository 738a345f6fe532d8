"""Sinkhorn-Knopp teacher targets (DINOv2, Oquab et al. 2023; SwAV, Caron et al. 2020).

The teacher's ``exp(t / tau_t)`` over the batch (all processes together) is normalised
alternately so that every prototype receives the same total mass and every sample's targets sum
to one: a balanced soft assignment, which by construction cannot collapse onto one prototype.
As DINOv2's ``sinkhorn_knopp_teacher``: 3 iterations, rows (samples) of the result sum to 1.
The logits are shifted by their global maximum before ``exp`` (a constant factor that the first
normalisation removes exactly), so large logits cannot overflow.
"""

from __future__ import annotations

from typing import Any

import torch

import dinocli
from dinocli.distributed import all_reduce_max, all_reduce_sum, world_size
from dinocli.interfaces import CollapseStrategy

_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Targets ``[N, K]`` from logits ``[N, K]``; sums over samples are reduced over processes.

    After the last iteration each row sums to 1 and, over the global batch of ``B`` samples, each
    prototype's column sums to ``B / K`` (exactly so when the iterations have converged).
    """
    logits = teacher_logits.float()
    q = torch.exp((logits - all_reduce_max(logits.max().reshape(1))) / temperature).t()  # [K, N]
    n_prototypes = q.shape[0]
    n_samples = q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum().reshape(1)).clamp_min(_TINY)
    for _ in range(n_iterations):
        row_sums = all_reduce_sum(q.sum(dim=1, keepdim=True))  # per prototype, global batch
        q /= row_sums.clamp_min(_TINY)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(_TINY)  # per sample, local
        q /= n_samples
    q *= n_samples
    return q.t()


class SinkhornKnopp(CollapseStrategy):
    """Teacher targets by Sinkhorn-Knopp normalisation instead of centering (no state)."""

    provides_targets = True

    def __init__(self, n_iterations: int = 3) -> None:
        super().__init__()
        self.n_iterations = n_iterations

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, temperature, self.n_iterations)


def build(sinkhorn_iterations: int = 3, **_: Any) -> SinkhornKnopp:
    return SinkhornKnopp(sinkhorn_iterations)


@dinocli.hookimpl
def dinocli_register_collapse_strategies(register) -> None:
    register("sinkhorn-knopp", build, description="Sinkhorn-Knopp teacher targets (DINOv2)")
