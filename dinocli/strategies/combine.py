"""Combined strategies: ``--collapse centering,koleo`` is one target provider plus regularisers.

:func:`build_collapse_strategy` is what training calls: a single name gives that strategy itself
(so its checkpointed state keeps its own keys, e.g. ``center``), several comma-separated names
give a :class:`CombinedStrategy` whose state dict nests each part under its name
(``centering.center``).
"""

from __future__ import annotations

from typing import Any

import torch

from dinocli.errors import UsageError
from dinocli.interfaces import CollapseStrategy
from dinocli.registry import create_collapse_strategy


class CombinedStrategy(CollapseStrategy):
    """Exactly one part provides the targets; every part's regulariser is added to the loss."""

    provides_targets = True

    def __init__(self, parts: dict[str, CollapseStrategy]) -> None:
        super().__init__()
        providers = [name for name, part in parts.items() if getattr(part, "provides_targets", True)]
        if len(providers) != 1:
            raise UsageError(_provider_message(list(parts), providers))
        self.names = list(parts)
        self.provider = providers[0]
        for name, part in parts.items():
            self.add_module(name, part)

    def parts(self) -> list[tuple[str, CollapseStrategy]]:
        """``(name, strategy)`` of every part, in the order given."""
        return [(name, getattr(self, name)) for name in self.names]

    def targets(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return getattr(self, self.provider).targets(teacher_logits, temperature)

    def regularizer(
        self, student_embeddings: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor | None:
        terms = [part.regularizer(student_embeddings, student_logits) for _, part in self.parts()]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        for _, part in self.parts():
            part.update(teacher_logits)

    def metrics(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for name, part in self.parts():
            for key, value in part.metrics().items():
                merged[f"{name}.{key}" if key in merged else key] = value
        return merged


def parse_collapse(spec: str) -> list[str]:
    """The strategy names in ``spec`` (comma-separated); empty or repeated names are errors."""
    names = [name.strip() for name in str(spec).split(",")]
    if not spec or any(not name for name in names):
        raise UsageError(
            f"--collapse {spec!r} has an empty name; give names separated by commas, e.g. "
            "'centering' or 'centering,koleo'"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--collapse {spec!r} names {', '.join(repeated)} more than once")
    return names


def build_collapse_strategy(spec: str, **kwargs: Any) -> CollapseStrategy:
    """The strategy for ``--collapse spec``: one registered name, or a combination of several.

    Unknown names are errors that suggest the closest registered name; a single name or a
    combination must contain exactly one strategy that provides teacher targets.
    """
    names = parse_collapse(spec)
    parts = {name: create_collapse_strategy(name, **kwargs) for name in names}
    if len(parts) == 1:
        (name, strategy), = parts.items()
        if not getattr(strategy, "provides_targets", True):
            raise UsageError(_provider_message(names, []))
        return strategy
    providers = [n for n, p in parts.items() if getattr(p, "provides_targets", True)]
    if len(providers) != 1:
        raise UsageError(_provider_message(names, providers))
    return CombinedStrategy(parts)


def _provider_message(names: list[str], providers: list[str]) -> str:
    spec = ",".join(names)
    if not providers:
        return (
            f"--collapse {spec!r} has no strategy that makes teacher targets "
            f"({', '.join(names)} only {'adds' if len(names) == 1 else 'add'} a regulariser); add exactly one target provider, "
            f"e.g. --collapse centering,{spec} or sinkhorn-knopp,{spec}"
        )
    return (
        f"--collapse {spec!r} has {len(providers)} strategies that make teacher targets "
        f"({', '.join(providers)}); keep exactly one and add regularisers to it, e.g. "
        f"--collapse {providers[0]},koleo"
    )


__all__ = ["CombinedStrategy", "build_collapse_strategy", "parse_collapse"]
