"""The ``dino`` command: a thin Typer layer over the Python API, one module per command."""

from __future__ import annotations

import sys

# Each module adds its command; the order here is the order of the panels and commands in --help.
from dinocli.cli import demo, pretrain, bench, report, shards  # noqa: F401, I001  (Train)
from dinocli.cli import extract, knn, linear  # noqa: F401  (Evaluate)
from dinocli.cli import attn_maps, plugins  # noqa: F401  (Inspect)
from dinocli.cli import export  # noqa: F401  (Models)
from dinocli.cli.app import app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dino`` console script; usage errors are one line on stderr."""
    try:
        code = app(args=argv, prog_name="dino", standalone_mode=False)
    except Exception as exc:
        # Typer's usage errors (wrong option, bad value) carry a message and an exit code.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
