"""Training checkpoints: written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinocli.io import atomic_path
from dinocli.weights import BACKBONE_SPEC_KEY, torch_load

LATEST = "checkpoint.pth"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename over ``path``: a crash never corrupts it."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (or the reference implementation)."""
    return torch_load(path)


def rng_state() -> dict[str, Any]:
    """The global RNG states that training consumes (stochastic depth, initialisation)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["BACKBONE_SPEC_KEY", "LATEST", "load_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]
