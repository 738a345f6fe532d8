"""``me-max``: mean-entropy maximisation, the regulariser of MSN (Assran et al. 2022).

The student's probabilities ``p_i = softmax(z_i / student_temp)`` are averaged over the batch (and
over all processes); the regulariser is ``weight * (log K - H(mean_i p_i))`` with ``K = out_dim``
and ``H`` the entropy. It is 0 when the outputs use every prototype equally on average and grows
as they collapse onto a few, while each ``p_i`` may stay confident. It provides no teacher targets:
combine it with a strategy that does (e.g. ``centering``), or let the loop use plain softmax.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from dinocli.distributed import is_distributed, world_size
from dinocli.errors import UsageError
from dinocli.interfaces import CollapseStrategy


class _AllReduceMean(torch.autograd.Function):
    """Mean over processes in the forward pass; each process keeps its own gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x / world_size()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class MeMax(CollapseStrategy):
    """A regulariser only (``provides_targets = False``); it has no state to checkpoint."""

    provides_targets = False

    def __init__(self, out_dim: int, student_temp: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        if out_dim < 2 or student_temp <= 0:
            raise UsageError(
                f"me-max needs out_dim >= 2 and student_temp > 0, got {out_dim} and {student_temp}"
            )
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.weight = weight
        self._last_entropy: torch.Tensor | None = None  # read by metrics(), at logged iterations only

    def mean_probabilities(self, student_logits: torch.Tensor) -> torch.Tensor:
        """``mean_i softmax(z_i / student_temp)`` over the batch and all processes, ``[out_dim]``."""
        if student_logits.shape[-1] != self.out_dim:
            width = student_logits.shape[-1]
            raise ValueError(f"me-max expects {self.out_dim} logits per row, got {width}")
        mean = torch.softmax(student_logits.float() / self.student_temp, dim=-1).mean(dim=0)
        return _AllReduceMean.apply(mean) if is_distributed() else mean

    def regularizer(self, student_embeddings: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        entropy = torch.special.entr(self.mean_probabilities(student_logits)).sum()
        self._last_entropy = entropy.detach()  # float() here would make the host wait for the GPU
        return self.weight * (math.log(self.out_dim) - entropy)

    def metrics(self) -> dict[str, float]:
        """The entropy of the last mean probabilities (none before the first call)."""
        return {} if self._last_entropy is None else {"mean_entropy": float(self._last_entropy)}


def build_me_max(
    out_dim: int = 65536, student_temp: float = 0.1, me_max_weight: float = 1.0, **_: Any
) -> MeMax:
    """Factory: dinocli passes ``out_dim``, ``student_temp`` (and ``n_global``, ``n_crops``, unused)."""
    return MeMax(out_dim=out_dim, student_temp=student_temp, weight=me_max_weight)
