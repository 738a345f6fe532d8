"""``dino knn``: weighted k-NN accuracy of frozen features (from files, or extracted first)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command
from dinocli.cli.extract import (
    PANEL,
    Arch,
    AvgPool,
    BatchSize,
    CheckpointKey,
    CropSize,
    Depth,
    Device,
    Interpolation,
    NLastBlocks,
    NumWorkers,
    PatchEmbedding,
    PatchSize,
    Pooling,
    Precision,
    RandomInit,
    RawPixels,
    Resize,
    Seed,
    TrainData,
    TrainFeatures,
    ValData,
    ValFeatures,
    Weights,
    check_before_loading,
    extract_with_progress,
    input_form,
    load_feature_pair,
    load_model,
)
from dinocli.errors import UsageError
from dinocli.io import JSON_FILE, check_output_path


@command(
    name="knn",
    rich_help_panel=PANEL,
    short_help="Weighted k-NN accuracy of frozen features (the paper's k-NN), with FAISS.",
    examples=(
        "dino knn --train train.safetensors --val val.safetensors",
        "dino knn --weights runs/vits16/checkpoint.pth --train-data DIR/train --val-data DIR/val -k 20",
    ),
)
def knn_command(
    train: TrainFeatures = None,
    val: ValFeatures = None,
    k: Annotated[
        list[int] | None, typer.Option("-k", "--k", help="Neighbours; repeat for several \\[default: 10 20 100 200].")
    ] = None,
    temperature: Annotated[
        list[float] | None,
        typer.Option("--temperature", "-t", help="Vote temperature T; repeatable \\[default: 0.07]."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Add per-class top-1 accuracy.")] = False,
    weights: Weights = None,
    train_data: TrainData = None,
    val_data: ValData = None,
    checkpoint_key: CheckpointKey = "teacher",
    arch: Arch = None,
    patch_size: PatchSize = None,
    random_init: RandomInit = False,
    patch_embed: PatchEmbedding = None,
    pool: Pooling = None,
    depth: Depth = None,
    raw_pixels: RawPixels = False,
    seed: Seed = 0,
    resize: Resize = 256,
    crop_size: CropSize = 224,
    interpolation: Interpolation = "bicubic",
    n_last_blocks: NLastBlocks = 1,
    avgpool_patch_tokens: AvgPool = False,
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = None,
    precision: Precision = "auto",
    device: Device = "auto",
    index: Annotated[
        str, typer.Option("--index", help="flat (exact), ivf or hnsw (approximate).", rich_help_panel="Index")
    ] = "flat",
    nlist: Annotated[
        int | None, typer.Option("--nlist", help="ivf: clusters \\[default: sqrt(N) / 2].", rich_help_panel="Index")
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            help="ivf: clusters searched per query \\[default: calibrated on the recall sample: from nlist/8, "
            "x1.25 a step, until recall@20 >= 0.95; more candidates re-scored exactly first if that needs it].",
            rich_help_panel="Index",
        ),
    ] = None,
    hnsw_m: Annotated[
        int, typer.Option("--hnsw-m", help="hnsw: neighbours per graph node.", rich_help_panel="Index")
    ] = 32,
    ef_search: Annotated[
        int, typer.Option("--ef-search", help="hnsw: search breadth (at least k).", rich_help_panel="Index")
    ] = 128,
    ef_construction: Annotated[
        int, typer.Option("--ef-construction", help="hnsw: build breadth.", rich_help_panel="Index")
    ] = 200,
    recall_sample: Annotated[
        int,
        typer.Option(
            "--recall-sample",
            help="Val features on which an approximate index's recall is measured.",
            rich_help_panel="Index",
        ),
    ] = 256,
    query_batch_size: Annotated[
        int,
        typer.Option(
            "--query-batch-size", help="Val features searched at once (bounds memory).", rich_help_panel="Index"
        ),
    ] = 4096,
) -> None:
    """Classify val images by a weighted vote of their nearest train images (the DINO k-NN)."""
    from dinocli.evaluate.features_io import require_same_classes
    from dinocli.evaluate.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, IndexSpec, knn_features

    check_output_path(json_out, "--json", inputs=[("--weights", weights), ("--train", train), ("--val", val)],
                      replaces=JSON_FILE)  # fmt: skip
    form = input_form(train, val, train_data, val_data)
    if form == "files":
        train_feats, val_feats = load_feature_pair(train, val)
    elif form == "images":
        options = dict(
            resize=resize,
            crop_size=crop_size,
            interpolation=interpolation,
            n_last_blocks=n_last_blocks,
            avgpool_patch_tokens=avgpool_patch_tokens,
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            device=device,
        )
        train_images = check_before_loading(train_data, options)
        val_images = check_before_loading(val_data, options)
        require_same_classes(train_images[2], val_images[2])  # before the model loads and extracts
        model, _ = load_model(
            weights,
            checkpoint_key,
            arch,
            patch_size,
            random_init,
            raw_pixels,
            crop_size,
            seed,
            patch_embed,
            pool,
            depth,
        )
        train_feats = extract_with_progress(model, train_data, images=train_images, **options)
        val_feats = extract_with_progress(model, val_data, images=val_images, **options)
    else:
        raise UsageError("give --train and --val features files, or --weights with --train-data and --val-data")

    ks = list(k) if k else [x for x in DEFAULT_KS if x <= len(train_feats)] or [len(train_feats)]
    dropped = [] if k else [x for x in DEFAULT_KS if x > len(train_feats)]
    spec = IndexSpec(index, nlist, nprobe, hnsw_m, ef_search, ef_construction)
    report = knn_features(
        train_feats,
        val_feats,
        ks,
        temperature=list(temperature) if temperature else [DEFAULT_TEMPERATURE],
        index=spec,
        device=device,
        batch_size=query_batch_size,
        per_class=per_class,
        recall_sample=recall_sample,
    )
    if dropped:
        print(f"note: skipped k={dropped}: the train set has {len(train_feats)} features", file=sys.stderr)
    if json_out is not None:
        from dinocli.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(report.as_dict(), indent=2) + "\n")
    _print_report(report, per_class)


def _print_report(report, per_class: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"k-NN: {report.num_train} train, {report.num_val} val, {report.num_classes} classes "
        f"({report.index}, {report.backend})"
    )
    for col in ("k", "T", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    for r in report.results:
        top5 = "-" if r.top5 is None else f"{r.top5:.2f}"
        table.add_row(str(r.k), f"{r.temperature:g}", f"{r.top1:.2f}", top5)
    console = Console(soft_wrap=True)
    console.print(table)
    if report.recall is not None:
        rec = report.recall
        figures = ", ".join(f"@{k} {value:.4f}" for k, value in rec["at_k"].items())
        console.print(
            f"recall of the {report.index} index against exact search on {rec['sample']} val features: {figures}"
        )
    if per_class:
        classes = Table(title="per-class top-1 %")
        classes.add_column("class")
        for r in report.results:
            classes.add_column(f"k={r.k} T={r.temperature:g}", justify="right")
        names = list(report.results[0].per_class or {})
        for name in names:
            classes.add_row(name, *(f"{(r.per_class or {})[name]:.2f}" for r in report.results))
        console.print(classes)
