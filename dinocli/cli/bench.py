"""``dino bench``: measure decode, augmentation and training-step rates; name the bottleneck."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command


@command(
    name="bench",
    rich_help_panel="Train",
    short_help="What limits training here: decoding, augmentation or the model; the end-to-end rate.",
    examples=("dino bench --data ~/images", "dino bench --data ~/images --arch vit_small --device cuda"),
)
def bench_command(
    data: Annotated[Path, typer.Option("--data", help="Folder of training images (searched recursively), or tar shards.")],
    arch: Annotated[str, typer.Option("--arch", help="Backbone to time (see `dino plugins`).")] = "vit_small",
    patch_size: Annotated[int, typer.Option("--patch-size", help="ViT patch size.")] = 16,
    out_dim: Annotated[int, typer.Option("--out-dim", help="Prototypes of the DINO head.")] = 65536,
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    num_workers: Annotated[
        int, typer.Option("--num-workers", help="Data-loading workers to time; -1: as dino pretrain picks them.")
    ] = -1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step.")] = 64,
    augment_on: Annotated[
        str,
        typer.Option(
            "--augment-on", help="cpu; split: colour timed in the step; gpu: decoding and augmentation timed in the step."
        ),
    ] = "cpu",
    images: Annotated[int, typer.Option("--images", help="Images decoded/augmented per measurement.")] = 200,
    steps: Annotated[int, typer.Option("--steps", help="Timed training steps (after one warm-up).")] = 5,
    global_crop_size: Annotated[int, typer.Option("--global-crop-size", help="Global crop size (px).")] = 224,
    local_crop_size: Annotated[int, typer.Option("--local-crop-size", help="Local crop size (px).")] = 96,
    local_crops_number: Annotated[int, typer.Option("--local-crops-number", help="Local crops per image.")] = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print only the figures, as JSON.")] = False,
) -> None:
    """Measure decode, augmentation (per worker and with N workers) and training-step rates on this
    machine; say whether data or model limits training and recommend --num-workers."""
    from dinocli.bench import recommend_workers, run_bench

    result = run_bench(
        data, arch=arch, patch_size=patch_size, out_dim=out_dim, precision=precision, device=device,
        num_workers=num_workers, batch_size=batch_size, images=images, steps=steps,
        augment_on=augment_on, global_crop_size=global_crop_size, local_crop_size=local_crop_size,
        local_crops_number=local_crops_number,
    )  # fmt: skip
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
