"""What each kind of plugin provides. The training loop relies on these and nothing else."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from dinocli.errors import DinoError


@runtime_checkable
class Backbone(Protocol):
    """An image encoder: ``forward(x: [B, 3, H, W]) -> [B, embed_dim]`` (an ``nn.Module``)."""

    embed_dim: int
    patch_size: int | None
    supports_attention: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def require_embeddings(out: Any, images: torch.Tensor, backbone: nn.Module, what: str) -> torch.Tensor:
    """``out``, the output of ``backbone`` for ``images``, if it is ``[B, embed_dim]`` (shapes only:
    the host does not wait for the device); else a :class:`DinoError` that names ``what`` (the
    backbone and its plugin)."""
    dim = getattr(backbone, "embed_dim", None)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == images.shape[0] and dim in (None, out.shape[1]):
        return out
    got = f"a {list(out.shape)} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
    raise DinoError(
        f"{what} returned {got} for a batch of {list(images.shape)}; a backbone returns "
        f"[images, embed_dim] = [{images.shape[0]}, {dim if dim is not None else 'D'}]"
    )


def require_crops(crops: Any, augmentation: Any, what: str) -> list[torch.Tensor]:
    """``crops``, the output of ``augmentation`` for one image, if they are its ``n_global``
    global then ``n_local`` local float tensors ``[3, h, w]``, each kind of one size; else a
    :class:`DinoError` that names ``what`` (the augmentation and its plugin)."""
    n_global, n_local = augmentation.n_global, augmentation.n_local
    problem = None
    if not isinstance(crops, (list, tuple)):
        problem = f"a {type(crops).__name__}"
    elif len(crops) != n_global + n_local:
        problem = f"{len(crops)} crops"
    else:
        for k, crop in enumerate(crops):
            if not isinstance(crop, torch.Tensor):
                problem = f"a {type(crop).__name__} as crop {k}"
            elif crop.ndim != 3 or crop.shape[0] != 3 or not crop.is_floating_point():
                problem = f"a {crop.dtype} tensor of shape {list(crop.shape)} as crop {k}"
            if problem:
                break
        for first, last, kind in ((0, n_global, "global"), (n_global, n_global + n_local, "local")):
            sizes = set() if problem else {tuple(c.shape) for c in crops[first:last]}
            if len(sizes) > 1:
                problem = f"{kind} crops of different sizes {sorted(map(list, sizes))}"
    if problem is None:
        return list(crops)
    raise DinoError(
        f"{what} returned {problem}; an augmentation returns n_global + n_local = {n_global} + {n_local} "
        "float tensors [3, h, w], the global crops first"
    )


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
