"""What each kind of plugin provides. The training loop relies on these and nothing else."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """An image encoder: ``forward(x: [B, 3, H, W]) -> [B, embed_dim]`` (an ``nn.Module``)."""

    embed_dim: int
    patch_size: int | None
    supports_attention: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Augmentation(Protocol):
    """Multi-crop views of one image: ``n_global`` global crops first, then ``n_local`` local crops."""

    n_global: int
    n_local: int

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]: ...


@runtime_checkable
class Logger(Protocol):
    """A metrics sink. ``log(record)`` gets each record the run writes to ``metrics.jsonl``: a dict
    with ``iteration`` (the step), ``epoch``, ``summary`` (absent for per-iteration records,
    ``"epoch"`` or ``"knn"`` otherwise) and numbers (``loss``, ``lr``, ``knn_top1`` ...). ``close()``
    ends the run. Optional: ``rewind(iteration)``, called when a run resumes from a checkpoint taken
    at ``iteration``: forget anything logged after it."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class CollapseStrategy(nn.Module):
    """Base class of collapse-avoidance strategies; buffers are checkpointed state.

    The loop calls, per iteration: ``targets`` on the teacher logits of the global crops (when
    ``provides_targets``), ``regularizer`` on the student's outputs, and ``update`` after the
    loss with the same teacher logits. Batch statistics are reduced over all processes.
    """

    provides_targets: bool = True

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Target probabilities ``[N, out_dim]`` from teacher logits ``[N, out_dim]``."""
        raise TypeError(f"{type(self).__name__} does not provide teacher targets")

    def regularizer(
        self, student_embeddings: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor | None:
        """An extra loss term, or ``None``. Embeddings are the backbone outputs of the global crops."""
        return None

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Update state (e.g. a center) after the iteration's loss was computed."""

    def metrics(self) -> dict[str, float]:
        """Figures logged with each logged iteration (e.g. the center norm), called only then.

        Read device values (``float()``, ``.item()``) here, not in the other methods: on a GPU,
        each read makes the host wait for the device, every step.
        """
        return {}
