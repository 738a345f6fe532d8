"""The Typer app and the error handling every command shares."""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from dinocli.errors import DEBUG_ENV, DinoError, debug_enabled

def examples_epilog(*lines: str) -> str:
    """A help epilog of example command lines, one per line as rich prints it."""
    body = "\n".join(f"  [bold]$[/bold] {line}" for line in lines)
    return f"[bold]Examples[/bold]\n\n{body}"


app = typer.Typer(
    name="dino",
    help="DINO self-supervised learning of vision transformers.",
    epilog=examples_epilog(
        "dino demo",
        "dino pretrain --data ~/images --output runs/vits16 --epochs 100",
        "dino knn --weights runs/vits16/checkpoint.pth --train-data DIR/train --val-data DIR/val",
        "dino attn-maps --weights runs/vits16/checkpoint.pth photo.jpg --output attn",
        "dino export --weights runs/vits16/checkpoint.pth --output vits16.safetensors",
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,
)

def _version(value: bool) -> None:
    if value:
        from dinocli import __version__

        typer.echo(f"dinocli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """DINO self-supervised learning of vision transformers."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def fail(message: str, code: int) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


def command(*, examples: tuple[str, ...] = (), **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command`` that turns errors into one line on stderr and an exit code.

    :class:`DinoError` exits with its own code (2 for bad input, 1 for runtime failures); any
    other exception exits with 1; Ctrl-C exits with 130. ``--debug`` shows the traceback.
    ``examples`` are command lines shown at the end of the command's ``--help``.
    """
    if examples:
        kwargs.setdefault("epilog", examples_epilog(*examples))

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt:
                _maybe_traceback()
                fail("interrupted", 130)
            except DinoError as exc:
                _maybe_traceback()
                fail(describe(exc), exc.exit_code)
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                _maybe_traceback()
                hint = "" if debug_enabled() else " (run with --debug for the traceback)"
                fail(describe(exc) + hint, 1)

        return app.command(**kwargs)(wrapper)

    return decorate


#: How PyTorch re-raises an exception of a data-loading worker: its traceback inside the message.
_WORKER_FAILURE = re.compile(r"Caught (\w+) in (DataLoader worker process \d+)\.\s+Original Traceback")


def describe(exc: BaseException) -> str:
    """The message of ``exc`` (prefixed with its type unless it is a :class:`DinoError`). An
    exception from a data-loading worker is told by its own last line, not by the traceback that
    PyTorch puts in its message."""
    text = str(exc)
    expected = isinstance(exc, DinoError)
    if found := _WORKER_FAILURE.match(text):
        kind, worker = found.groups()
        last = next(line.strip() for line in reversed(text.splitlines()) if line.strip())
        name, colon, message = last.partition(": ")
        text = message if colon and name.split(".")[-1] == kind else last
        return text if expected else f"{kind}: {text} (in {worker})"
    return text if expected else f"{type(exc).__name__}: {text}"


def _maybe_traceback() -> None:
    if debug_enabled():
        traceback.print_exc()
