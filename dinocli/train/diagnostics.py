"""Collapse diagnostics of a training batch, and a detector that warns when collapse sets in.

DINO can collapse in two ways (Caron et al. 2021, Sec. 5.3): *uniform* (the teacher's targets
become uniform; the loss sticks at ``ln(out_dim)``) when centering dominates sharpening, and
*dominant* (one prototype takes every image; the embeddings stop depending on the image) when
sharpening dominates. :func:`batch_diagnostics` measures both from one iteration's tensors;
:class:`CollapseDetector` turns a run of logged records into one clear warning per kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dinocli.train.loss import multicrop_cross_entropy

#: The keys :func:`batch_diagnostics` returns.
DIAGNOSTIC_KEYS = (
    "teacher_entropy", "student_entropy", "kl_teacher_student", "teacher_max_prob",
    "teacher_prototypes", "top_prototype_share", "embedding_std", "effective_rank",
)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probs`` ``[N, K]`` (``0 log 0 = 0``)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of the L2-normalised rows of ``[N, D]``.

    0 when every embedding is the same; about ``1 / sqrt(D)`` for directions spread uniformly.
    """
    z = F.normalize(embeddings.float(), dim=-1)
    return float(z.std(dim=0, unbiased=False).mean())


def effective_rank(embeddings: torch.Tensor) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the L2-normalised rows.

    The RankMe measure (Garrido et al. 2023): 1 when all embeddings are parallel, up to
    ``min(N, D)`` when they span every direction equally.
    """
    z = F.normalize(embeddings.float(), dim=-1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(entropy(p[None])[0]))


@torch.no_grad()
def batch_diagnostics(
    targets: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> dict[str, float]:
    """Collapse figures of one iteration (this process's batch).

    ``targets``: teacher probabilities of the global views ``[n_global * B, K]``;
    ``student_logits``: ``[n_crops * B, K]``; ``teacher_embeddings``: the teacher backbone's
    outputs of the global views ``[n_global * B, D]``. Entropies are in nats (at most
    ``ln K``); the KL divergence is averaged over the same (teacher view, other student view)
    pairs as the DINO loss.
    """
    targets = targets.float()
    student_probs = F.softmax(student_logits.float() / student_temp, dim=-1)
    teacher_entropy = entropy(targets).mean()
    cross_entropy = multicrop_cross_entropy(student_logits, targets, n_crops, student_temp)
    winners = targets.argmax(dim=-1)
    counts = torch.bincount(winners, minlength=targets.shape[-1])
    return {
        "teacher_entropy": float(teacher_entropy),
        "student_entropy": float(entropy(student_probs).mean()),
        "kl_teacher_student": float(cross_entropy - teacher_entropy),
        "teacher_max_prob": float(targets.max(dim=-1).values.mean()),
        "teacher_prototypes": int((counts > 0).sum()),
        "top_prototype_share": float(counts.max()) / max(len(winners), 1),
        "embedding_std": embedding_std(teacher_embeddings),
        "effective_rank": effective_rank(teacher_embeddings),
    }


ADVICE = {
    "uniform": (
        "uniform collapse: the teacher's targets are almost uniform and the loss is stuck near "
        "ln(out_dim) = {max_entropy:.3f} (loss {loss:.3f}, teacher entropy {teacher_entropy:.3f}) "
        "since iteration {since}. Centering dominates sharpening: on small data or in short runs "
        "try --collapse sinkhorn-knopp,koleo with --momentum-teacher 0.95 (what --recipe small-data "
        "does); otherwise a lower --teacher-temp (e.g. 0.04) and --warmup-teacher-temp, a smaller "
        "--lr, or --collapse sinkhorn-knopp."
    ),
    "dominant": (
        "dominant collapse: {top_prototype_share:.0%} of the batch goes to one prototype "
        "and the embeddings barely vary (spread {spread:.3f} of a uniform spread) since "
        "iteration {since}. Sharpening dominates centering: use --collapse centering or "
        "sinkhorn-knopp (add ,koleo to spread the embeddings), raise --teacher-temp slightly, or "
        "lower --lr."
    ),
}


@dataclass
class CollapseDetector:
    """Warns once per kind when a collapse condition holds for ``patience`` logged records in a row.

    Uniform: ``loss`` and ``teacher_entropy`` both above ``uniform_fraction * ln(out_dim)``.
    Dominant: ``top_prototype_share`` above ``dominant_share`` and the embedding spread
    (``embedding_std * sqrt(embed_dim)``, 1 for uniformly spread directions) below
    ``min_spread``. Records before epoch ``start_epoch`` are ignored: at initialisation a
    network legitimately looks collapsed (all images give nearly the same output).
    """

    out_dim: int
    embed_dim: int
    warn: Callable[[str], None] = print
    patience: int = 5
    start_epoch: int = 1
    uniform_fraction: float = 0.95
    dominant_share: float = 0.9
    min_spread: float = 0.1
    warned: set[str] = field(default_factory=set)
    _streak: dict[str, int] = field(default_factory=dict)
    _since: dict[str, int] = field(default_factory=dict)

    def conditions(self, record: dict[str, Any]) -> dict[str, bool]:
        """Which collapse conditions ``record`` meets (missing figures meet none)."""
        max_entropy = math.log(self.out_dim)
        loss, h = record.get("loss"), record.get("teacher_entropy")
        share, std = record.get("top_prototype_share"), record.get("embedding_std")
        uniform = (
            loss is not None and h is not None
            and loss > self.uniform_fraction * max_entropy
            and h > self.uniform_fraction * max_entropy
        )
        dominant = (
            share is not None and std is not None
            and share > self.dominant_share
            and std * math.sqrt(self.embed_dim) < self.min_spread
        )
        return {"uniform": uniform, "dominant": dominant}

    def check(self, record: dict[str, Any]) -> list[str]:
        """Feed one logged record; returns (and passes to ``warn``) the warnings issued now."""
        if record.get("epoch", 0) < self.start_epoch:
            return []
        issued = []
        for kind, met in self.conditions(record).items():
            if not met:
                self._streak[kind] = 0
                continue
            if self._streak.get(kind, 0) == 0:
                self._since[kind] = int(record.get("iteration", 0))
            self._streak[kind] = self._streak.get(kind, 0) + 1
            if self._streak[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                values = {k: v for k, v in record.items() if isinstance(v, (int, float))}
                values.update(
                    max_entropy=math.log(self.out_dim),
                    since=self._since[kind],
                    spread=record.get("embedding_std", 0.0) * math.sqrt(self.embed_dim),
                )
                message = "collapse warning: " + ADVICE[kind].format(**values)
                issued.append(kind)
                self.warn(message)
        return issued


__all__ = [
    "DIAGNOSTIC_KEYS", "CollapseDetector", "batch_diagnostics", "effective_rank", "embedding_std",
    "entropy",
]
