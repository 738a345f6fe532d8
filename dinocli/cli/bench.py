"""``dino bench``: measure decode, augmentation and training-step rates; name the bottleneck."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dinocli.cli.app import command
from dinocli.cli.options import pretrain_option


#: The ``dino pretrain`` options that shape what is timed: the model, the crops, the data path.
BENCH_OPTIONS = (
    "recipe", "arch", "patch_size", "patch_embed", "depth", "pool", "out_dim", "norm_last_layer", "use_bn_in_head",
    "drop_path_rate", "batch_size", "optimizer", "augmentation", "global_crops_scale", "local_crops_number",
    "local_crops_scale", "global_crop_size", "local_crop_size", "augment_on", "collapse", "num_workers",
    "precision", "device", "compile",
)  # fmt: skip


def bench_command(
    data: Path | None,
    config: Path | None,
    images: int,
    steps: int,
    json_out: bool,
    **options: Any,
) -> None:
    """Measure decode, augmentation (per worker and with N workers), training-step and end-to-end rates
    on this machine, with the options (or --config file) of a 'dino pretrain' run; say whether data or
    model limits training and recommend --num-workers."""
    from dinocli.bench import recommend_workers, run_bench

    result = run_bench(data, config=config, images=images, steps=steps, **options)
    if json_out:
        typer.echo(json.dumps(result.to_json()))
        return
    d = result.details
    typer.echo(
        f"{d['images']} images, {d['arch']}/{d['patch_size']} on {d['device']} ({d['precision']}), "
        f"batch {d['batch_size']}, augmentation on {d['augment_on']}"
    )
    typer.echo(f"  decode                     {result.decode_images_per_s:9.1f} images/s (1 process)")
    if bad := d["undecodable"]:
        typer.echo(f"  {len(bad)} of the files timed cannot be decoded (training skips them), e.g. {bad[0]}")
    typer.echo(f"  decode + augment           {result.augment_images_per_s_per_worker:9.1f} images/s per worker")
    typer.echo(f"  with {d['num_workers']:2d} workers            {result.augment_images_per_s:9.1f} images/s")
    typer.echo(f"  training step              {result.step_images_per_s:9.1f} images/s")
    typer.echo(
        f"  end to end (files -> step) {result.end_to_end_images_per_s:9.1f} images/s "
        f"(waiting for data {100 * d['data_wait_share']:.0f} % of the time)"
    )
    limit = "the data pipeline" if result.bottleneck == "data" else "the model"
    typer.echo(f"bottleneck: {result.bottleneck} ({limit} limits training)")
    typer.echo(
        f"recommended: --num-workers {result.recommended_num_workers} "
        f"(of {d['cpus']} CPUs; each worker gives {result.augment_images_per_s_per_worker:.0f} images/s)"
    )
    if d["split_images_per_s_per_worker"]:
        split = d["split_images_per_s_per_worker"]
        typer.echo(
            f"try: --augment-on split (colour on the training device): {split:.0f} images/s per worker, "
            f"--num-workers {recommend_workers(result.step_images_per_s, split, d['cpus'])} would feed the model"
        )


def _parameter(name: str, kind: Any, default: Any, *decls: str, help: str) -> inspect.Parameter:
    option = typer.Option(*decls, help=help, rich_help_panel="Bench")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])


_params = [
    _parameter("data", Optional[Path], None, "--data",
               help="Folder of training images (searched recursively), or tar shards [default: --config's data]."),
    _parameter("config", Optional[Path], None, "--config",
               help="A 'dino pretrain' TOML file (a run's config.toml): time that run; options below override it."),
    _parameter("images", int, 200, "--images", help="Images decoded/augmented per measurement."),
    _parameter("steps", int, 5, "--steps", help="Timed training steps (after one warm-up)."),
    _parameter("json_out", bool, False, "--json", help="Print only the figures, as JSON."),
    *(pretrain_option(name) for name in BENCH_OPTIONS),
]  # fmt: skip
bench_command.__signature__ = inspect.Signature(_params)  # type: ignore[attr-defined]
bench_command.__annotations__ = {p.name: p.annotation for p in _params}
command(
    name="bench",
    rich_help_panel="Train",
    short_help="What limits training here: decoding, augmentation or the model; the end-to-end rate.",
    examples=(
        "dino bench --data ~/images",
        "dino bench --data ~/images --arch vit_small --device cuda",
        "dino bench --config runs/vits16/config.toml --num-workers 10",
    ),
)(bench_command)
