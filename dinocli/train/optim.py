"""Optimisers, parameter groups and gradient clipping, as in the reference implementation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dinocli.errors import UsageError

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights with weight decay, and biases and norm parameters (1-D) without.

    As the reference, ``pos_embed`` and ``cls_token`` (not 1-D) get weight decay: a known quirk
    kept so that results match; frozen parameters (e.g. a fixed prototype norm) are left out.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017); 1-D parameters excluded."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    q = torch.where(
                        (param_norm > 0.0) & (update_norm > 0.0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """``adamw`` (the default), ``sgd`` (momentum 0.9) or ``lars``; lr and wd are set per iteration."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(groups)
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str = "per-tensor") -> None:
    """Clip gradients to ``max_norm``.

    ``per-tensor`` (the reference's behaviour): each tensor's gradient separately,
    ``g <- g * min(1, max_norm / (||g|| + 1e-6))``. ``global``: the usual clipping of the norm of
    all gradients together (:func:`torch.nn.utils.clip_grad_norm_`).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    scales = torch._foreach_add(torch._foreach_norm(grads), 1e-6)  # a few kernels, not one per tensor
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)
