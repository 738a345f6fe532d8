"""``dino pretrain``: its options are generated from :class:`dinocli.train.PretrainConfig`."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dinocli.cli.app import command
from dinocli.cli.options import pretrain_option
from dinocli.errors import UsageError
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


def pretrain_command(**options: Any) -> None:
    from dinocli.train import pretrain, resolve_config

    config_file = options.pop("config")
    nproc_per_node = options.pop("nproc_per_node")
    overrides = {k: v for k, v in options.items() if v is not None}
    main_process = os.environ.get("RANK", "0") == "0"
    explain = (lambda line: typer.echo(line, err=True)) if main_process else None
    cfg = resolve_config(config_file, overrides, explain=explain)
    if nproc_per_node is not None and nproc_per_node != 1:
        _launch(cfg, nproc_per_node)
        return
    result = pretrain(cfg)
    if not main_process:
        return  # under torchrun, the first process reports
    if not result.history:  # resumed a run that had already reached --epochs
        typer.echo(
            f"{result.checkpoint} has already trained {result.epochs} epoch(s) ({result.iterations} "
            "iterations); nothing to do: raise --epochs to train further"
        )
        return
    typer.echo(
        f"trained {result.epochs} epoch(s), {result.iterations} iterations; "
        f"last epoch loss {result.last_loss:.4f}\ncheckpoint: {result.checkpoint}"
    )


def _launch(cfg: Any, nproc_per_node: int) -> None:
    """Run this training in ``nproc_per_node`` processes under torchrun, with the resolved options."""
    from dinocli.data import list_images
    from dinocli.distributed import launch_local_processes, require_not_under_torchrun
    from dinocli.io import atomic_write_text, check_output_path
    from dinocli.train.config import to_toml

    # what every process would refuse alike is said once, here, before any process starts
    require_not_under_torchrun()
    check_output_path(Path(cfg.output), "--output", folder=True)
    images, global_batch = len(list_images(cfg.data)), cfg.batch_size * nproc_per_node
    if images < global_batch:
        raise UsageError(
            f"{images} images are fewer than one global batch of {global_batch} "
            f"({nproc_per_node} processes x --batch-size {cfg.batch_size}); lower --batch-size"
        )
    with tempfile.TemporaryDirectory(prefix="dinocli-launch-") as tmp:
        config = os.path.join(tmp, "config.toml")
        atomic_write_text(config, to_toml(cfg))
        launch_local_processes(nproc_per_node, ["pretrain", "--config", config])


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
    inspect.Parameter(
        "nproc_per_node",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[int],
            typer.Option(
                "--nproc-per-node",
                help="Train in N processes on this machine (one per GPU) through torchrun; "
                "--batch-size is per process. For several machines run torchrun yourself "
                "(docs/distributed.md).",
                rich_help_panel="Run",
                min=1,
            ),
        ],
    ),
    *(pretrain_option(name) for name in FIELDS),
]
pretrain_command.__signature__ = inspect.Signature(_params)  # type: ignore[attr-defined]
pretrain_command.__annotations__ = {p.name: p.annotation for p in _params}
pretrain_command.__doc__ = HELP
command(
    name="pretrain",
    rich_help_panel="Train",
    short_help="DINO pretraining on a folder of images; run again to resume.",
    examples=(
        "dino pretrain --data ~/images --output runs/vits16 --arch vit_small --epochs 100",
        "dino pretrain --data ~/images --output runs/small --recipe auto",
        "dino pretrain --config examples/vit_small_300ep.toml --data ~/images --output runs/vits16-300",
    ),
)(pretrain_command)
