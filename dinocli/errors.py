"""Errors that the CLI turns into one line on stderr and an exit code."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

#: Set to ``1`` by ``dino --debug``: tracebacks are shown beside the one-line errors.
DEBUG_ENV = "DINOCLI_DEBUG"


def debug_enabled() -> bool:
    """Whether ``dino --debug`` (or ``DINOCLI_DEBUG=1``) asked for tracebacks."""
    return os.environ.get(DEBUG_ENV) == "1"


class DinoError(Exception):
    """A failure the user can act on. Exit code 1 (runtime failure)."""

    exit_code = 1


class UsageError(DinoError):
    """Bad input or usage: a wrong option, a missing file, an unknown name. Exit code 2."""

    exit_code = 2


def unknown_name(
    kind: str, name: str, available: Iterable[str], similar: Iterable[str] = (), where: str = ""
) -> UsageError:
    """An error for an unknown ``name`` of ``kind`` (found ``where``: ``in config.toml``) that lists
    what exists and the closest match; ``similar`` are more names to suggest but not list (the
    members of a pattern such as ``timm/*``)."""
    choices = sorted(available)
    close = difflib.get_close_matches(name, [*choices, *similar], n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(choices) if choices else "none"
    return UsageError(f"unknown {kind} {name!r}{' ' + where if where else ''}.{hint} Available: {listing}.")
