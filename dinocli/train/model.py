"""Student and teacher: a backbone and a DINO head run over multi-crop views, and the EMA update."""

from __future__ import annotations

import torch
from torch import nn

from dinocli.interfaces import require_embeddings


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of views; views of the same size share one backbone pass.

    State-dict keys are ``backbone.*`` and ``head.*``, as the reference ``MultiCropWrapper``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str = "the backbone") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name  # in the error for an output of the wrong shape

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings, logits)``, each with the views stacked in order: ``[len(views) * B, ...]``."""
        embeddings = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            batch = torch.cat(views[start:end])
            embeddings.append(require_embeddings(self.backbone(batch), batch, self.backbone, self.name))
            start = end
        emb = torch.cat(embeddings)
        return emb, self.head(emb)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter (buffers untouched)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
