"""``dino pretrain``: its options are generated from :class:`dinocli.train.PretrainConfig`."""

from __future__ import annotations

import inspect
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dinocli.cli.app import command
from dinocli.train.config import FIELDS

HELP = " ".join(
    """Pretrain a ViT (or any backbone plugin) with DINO self-distillation.
    Defaults are the reference implementation's (main_dino.py).
    Running the same command again with the same --output resumes from RUN/checkpoint.pth
    (raise --epochs to extend a finished run); --init-from starts a new run from given weights.
    Quirks of the reference kept on purpose: per-tensor gradient clipping (--clip-grad-mode),
    weight decay on pos_embed and cls_token, and a constant teacher temperature of 0.04 (see
    examples/ for the paper's 0.04 -> 0.07 warm-up recipe).""".split()
)


def _default(name: str) -> Any:
    f = FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _option(name: str) -> inspect.Parameter:
    f = FIELDS[name]
    default = _default(name)
    flag = name.replace("_", "-")
    decls = [f"--{flag}/--no-{flag}"] if isinstance(default, bool) else [f"--{flag}"]
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f.metadata["help"] + (f" \\[default: {shown}]" if shown != "" else "")
    kind = tuple[float, float] if isinstance(default, tuple) else type(default)
    option = typer.Option(*decls, help=help_text, rich_help_panel=f.metadata["panel"], show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]
    )


def pretrain_command(**options: Any) -> None:
    from dinocli.train import pretrain, resolve_config

    config_file = options.pop("config")
    overrides = {k: v for k, v in options.items() if v is not None}
    cfg = resolve_config(config_file, overrides)
    result = pretrain(cfg)
    typer.echo(
        f"trained {result.epochs} epoch(s), {result.iterations} iterations; "
        f"last epoch loss {result.last_loss:.4f}\ncheckpoint: {result.checkpoint}"
    )


_params = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[Path],
            typer.Option(
                "--config", help="TOML file of options (defaults < file < command line).",
                rich_help_panel="Run",
            ),
        ],
    ),
    *(_option(name) for name in FIELDS),
]
pretrain_command.__signature__ = inspect.Signature(_params)  # type: ignore[attr-defined]
pretrain_command.__annotations__ = {p.name: p.annotation for p in _params}
pretrain_command.__doc__ = HELP
command(name="pretrain", rich_help_panel="Train")(pretrain_command)
