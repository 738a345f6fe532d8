"""``dino linear``: a linear classifier on frozen features, the paper's linear evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dinocli.cli.app import command
from dinocli.cli.extract import (
    PANEL,
    Arch,
    BatchSize,
    CheckpointKey,
    Depth,
    Device,
    Interpolation,
    NumWorkers,
    PatchEmbedding,
    PatchSize,
    Pooling,
    Precision,
    RandomInit,
    RawPixels,
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
    progress_bar,
)
from dinocli.errors import UsageError
from dinocli.io import check_output_path

TRAIN = "Training"
MODES = ("fast", "reference")
#: eval_linear.py's default: the CLS tokens of the last 4 blocks.
REFERENCE_N_LAST_BLOCKS = 4


@command(
    name="linear",
    rich_help_panel=PANEL,
    short_help="Linear-probe accuracy of frozen features (the paper's): a fast lr sweep or eval_linear.py.",
    examples=(
        "dino linear --train train.safetensors --val val.safetensors --output linear.safetensors",
        "dino linear --weights runs/vits16/checkpoint.pth --train-data DIR/train --val-data DIR/val",
        "dino linear --mode reference --weights W --train-data DIR/train --val-data DIR/val --crop-size 32",
        "dino linear --evaluate linear.safetensors --val val.safetensors",
    ),
)
def linear_command(
    train: TrainFeatures = None,
    val: ValFeatures = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="fast: cached features, every --lr x --weight-decay at once, the best picked on a held-out part "
            "of train. reference: eval_linear.py's recipe, one lr; with --train-data, augmented crops through "
            "the backbone every epoch.",
            rich_help_panel=TRAIN,
        ),
    ] = "fast",
    lr: Annotated[
        list[float] | None,
        typer.Option(
            "--lr",
            help="Learning rate per 256 images (scaled by the batch size); repeatable "
            "\\[default: fast: DINOv2's 13 from 1e-5 to 0.1; reference: 0.001].",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    weight_decay: Annotated[
        list[float] | None,
        typer.Option("--weight-decay", help="Weight decay; repeatable (fast) \\[default: 0].", rich_help_panel=TRAIN),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of SGD.", rich_help_panel=TRAIN)] = 100,
    linear_batch_size: Annotated[
        int, typer.Option("--linear-batch-size", help="Images per SGD step.", rich_help_panel=TRAIN)
    ] = 128,
    holdout: Annotated[
        float,
        typer.Option("--holdout", help="fast: fraction of train held out to pick the lr (0: one lr, none held out).",
                     rich_help_panel=TRAIN),
    ] = 0.1,  # fmt: skip
    refit: Annotated[
        bool,
        typer.Option("--refit/--no-refit", help="fast: train the picked lr again on all of train.", rich_help_panel=TRAIN),
    ] = True,
    val_every: Annotated[
        int, typer.Option("--val-every", help="reference: val accuracy every N epochs.", rich_help_panel=TRAIN)
    ] = 1,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed of the init, batch order, held-out split, crops (and --random-init).",
                     rich_help_panel=TRAIN),
    ] = 0,  # fmt: skip
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the classifier here (.safetensors).")
    ] = None,
    evaluate: Annotated[
        Path | None,
        typer.Option("--evaluate", help="Only evaluate this classifier file on --val or --val-data."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
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
    resize: Annotated[
        int | None,
        typer.Option("--resize", help="Resize the shorter side \\[default: --crop-size x 256/224].",
                     rich_help_panel="Preprocessing"),
    ] = None,  # fmt: skip
    crop_size: Annotated[
        int | None,
        typer.Option("--crop-size", help="Centre crop (val) and random-resized crop (reference train) \\[default: 224].",
                     rich_help_panel="Preprocessing"),
    ] = None,  # fmt: skip
    interpolation: Interpolation = "bicubic",
    n_last_blocks: Annotated[
        int | None,
        typer.Option("--n-last-blocks", help="Concatenate the CLS tokens of the last K blocks \\[default: 4 "
                     "(eval_linear.py's), at most the depth].", rich_help_panel="Features"),
    ] = None,  # fmt: skip
    avgpool_patch_tokens: Annotated[
        bool | None,
        typer.Option("--avgpool-patch-tokens/--no-avgpool-patch-tokens",
                     help="Append the mean patch token of the last block \\[default: no].", rich_help_panel="Features"),
    ] = None,  # fmt: skip
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = None,
    precision: Precision = "auto",
    device: Device = "auto",
) -> None:
    """Train a linear classifier on frozen features and report its val top-1/top-5 (the DINO linear eval)."""
    from dinocli.evaluate.features_io import require_same_classes
    from dinocli.evaluate.linear import (
        CLASSIFIER_META_KEY,
        REFERENCE_LR,
        check_recipe,
        load_classifier,
        save_classifier,
    )
    from dinocli.io import JSON_FILE, has_safetensors_metadata

    if mode not in MODES:
        raise UsageError(f"--mode must be fast or reference, got {mode!r}")
    # the training options are checked before the (slow) model load and extraction
    if mode == "reference" and ((lr and len(lr) > 1) or (weight_decay and len(weight_decay) > 1)):
        raise UsageError("--mode reference trains one --lr and one --weight-decay; use --mode fast for a sweep")
    check_recipe(epochs, linear_batch_size, lr or [REFERENCE_LR], weight_decay or [0.0])
    if mode == "fast" and not 0 <= holdout < 1:
        raise UsageError(f"--holdout must be in [0, 1), got {holdout}")
    inputs = [("--weights", weights), ("--train", train), ("--val", val), ("--evaluate", evaluate)]
    classifier_file = ("a linear classifier file", has_safetensors_metadata(CLASSIFIER_META_KEY))
    check_output_path(output, "--output", inputs=inputs, replaces=classifier_file)
    check_output_path(json_out, "--json", inputs=[*inputs, ("--output", output)], replaces=JSON_FILE)
    classifier = load_classifier(evaluate) if evaluate is not None else None
    trained = (classifier.metadata.get("features", {}) if classifier else {})
    prep = trained.get("preprocessing", {})
    crop = crop_size or prep.get("crop_size") or 224
    extract_options: dict[str, Any] = dict(
        resize=resize or (prep.get("resize") if crop_size is None else None) or _default_resize(crop),
        crop_size=crop,
        interpolation=interpolation,
        n_last_blocks=n_last_blocks or trained.get("n_last_blocks"),
        avgpool_patch_tokens=trained.get("avgpool_patch_tokens", False) if avgpool_patch_tokens is None else avgpool_patch_tokens,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        device=device,
    )  # fmt: skip
    model_options = (weights, checkpoint_key, arch, patch_size, random_init, raw_pixels, crop, seed, patch_embed, pool, depth)

    if classifier is not None:
        if train is not None or train_data is not None:
            raise UsageError("--evaluate takes a val set only (--val or --val-data), not --train/--train-data")
        if (val is None) == (val_data is None):
            raise UsageError("--evaluate needs --val (features file) or --val-data (image folder, with --weights)")
        val_feats = _load_val(val, val_data, extract_options, model_options)
        _evaluate(classifier, val_feats, json_out)
        return
    form = input_form(train, val, train_data, val_data)
    if form == "files":
        train_feats, val_feats = load_feature_pair(train, val)
        report = _train_on_features(mode, train_feats, val_feats, lr, weight_decay, epochs, linear_batch_size,
                                    holdout, refit, val_every, seed, device, precision)  # fmt: skip
        if mode == "reference":
            _note("--mode reference on features files trained on the cached features: no augmentation")
    elif form == "images":
        train_images = check_before_loading(train_data, extract_options)
        val_images = check_before_loading(val_data, extract_options)
        require_same_classes(train_images[2], val_images[2])  # before the model loads and extracts
        model, info = load_model(*model_options)
        extract_options["n_last_blocks"] = extract_options["n_last_blocks"] or _default_n_last_blocks(model)
        val_feats = extract_with_progress(model, val_data, images=val_images, **extract_options)
        val_feats.metadata.update(info)
        if mode == "fast":
            train_feats = extract_with_progress(model, train_data, images=train_images, **extract_options)
            train_feats.metadata.update(info)
            report = _train_on_features(mode, train_feats, val_feats, lr, weight_decay, epochs, linear_batch_size,
                                        holdout, refit, val_every, seed, device, precision)  # fmt: skip
        else:
            report = _train_on_images(model, train_images, val_feats, lr, weight_decay, epochs, linear_batch_size,
                                      val_every, seed, extract_options)  # fmt: skip
    else:
        raise UsageError(
            "give --train and --val features files, or --weights with --train-data and --val-data "
            "(or --evaluate CLASSIFIER with --val)"
        )
    if output is not None:
        save_classifier(output, report.classifier)
    if json_out is not None:
        _write_json(json_out, {**report.as_dict(), **({"output": str(output)} if output else {})})
    _print_report(report, output)


def _default_resize(crop: int) -> int:
    from dinocli.evaluate.extract import reference_resize

    return reference_resize(crop)


def _default_n_last_blocks(model: Any) -> int:
    """eval_linear.py's 4, at most the ViT's depth; 1 for backbones without token outputs."""
    depth = len(getattr(model, "blocks", ()))
    if not depth or not hasattr(model, "get_intermediate_layers"):
        return 1
    return min(REFERENCE_N_LAST_BLOCKS, depth)


def _train_on_features(mode, train_feats, val_feats, lr, weight_decay, epochs, batch, holdout, refit, val_every,
                       seed, device, precision):  # fmt: skip
    from dinocli.evaluate.linear import REFERENCE_LR, linear_reference
    from dinocli.evaluate.linear_sweep import DEFAULT_LRS, linear_sweep

    wds = list(weight_decay) if weight_decay else [0.0]
    if mode == "reference":
        with progress_bar("linear (reference)", epochs * len(train_feats)) as advance:
            return linear_reference(
                train_feats, val_feats, lr=lr[0] if lr else REFERENCE_LR, weight_decay=wds[0], epochs=epochs,
                batch_size=batch, seed=seed, device=device, val_every=val_every,
                progress=lambda k: advance(k * len(train_feats)),
            )  # fmt: skip
    lrs = list(lr) if lr else list(DEFAULT_LRS)
    passes = 1 if holdout == 0 else 1 + int(refit)
    sweep_precision = "auto" if precision == "auto" else ("fp32" if precision == "fp32" else "bf16")
    with progress_bar(f"linear (fast, {len(lrs) * len(wds)} classifiers)", passes * epochs * len(train_feats)) as advance:
        return linear_sweep(
            train_feats, val_feats, lrs, wds, holdout=holdout, refit=refit, epochs=epochs, batch_size=batch,
            seed=seed, device=device, precision=sweep_precision, progress=lambda k: advance(k * len(train_feats)),
        )  # fmt: skip


def _train_on_images(model, images, val_feats, lr, weight_decay, epochs, batch, val_every, seed, options):
    from dinocli.evaluate.extract import default_num_workers
    from dinocli.evaluate.linear import REFERENCE_LR
    from dinocli.evaluate.linear_images import linear_reference_images

    paths, labels, classes = images
    workers = default_num_workers() if options["num_workers"] is None else options["num_workers"]
    with progress_bar("linear (reference, augmented)", epochs * len(paths)) as advance:
        return linear_reference_images(
            model, paths, labels, val_feats, classes=classes, crop_size=options["crop_size"],
            n_last_blocks=options["n_last_blocks"], avgpool_patch_tokens=options["avgpool_patch_tokens"],
            lr=lr[0] if lr else REFERENCE_LR, weight_decay=weight_decay[0] if weight_decay else 0.0,
            epochs=epochs, batch_size=batch, num_workers=min(workers, max(0, (len(paths) - 1) // batch)),
            precision=options["precision"], device=options["device"], seed=seed, val_every=val_every,
            progress=lambda k: advance(k * len(paths)),
        )  # fmt: skip
    return report


def _load_val(val, val_data, extract_options, model_options):
    from dinocli.evaluate.features_io import load_features

    if val is not None:
        return load_features(val)
    images = check_before_loading(val_data, extract_options)
    model, info = load_model(*model_options)
    extract_options["n_last_blocks"] = extract_options["n_last_blocks"] or _default_n_last_blocks(model)
    feats = extract_with_progress(model, val_data, images=images, **extract_options)
    feats.metadata.update(info)
    return feats


def _evaluate(classifier, val_feats, json_out: Path | None) -> None:
    from dinocli.evaluate.features_io import preprocessing_difference
    from dinocli.evaluate.linear import check_features_match

    check_features_match(classifier, val_feats)
    difference = preprocessing_difference(classifier.metadata.get("features", {}), val_feats.metadata)
    if difference is not None:
        typer.echo(f"warning: the classifier's train features were preprocessed differently ({difference})", err=True)
    top1, top5 = classifier.accuracy(val_feats)
    if json_out is not None:
        _write_json(json_out, {"top1": top1, "top5": top5, "num_val": len(val_feats), "num_classes": classifier.num_classes})
    top5_text = "" if top5 is None else f", top-5 {top5:.2f} %"
    typer.echo(f"linear: {len(val_feats)} val images, {classifier.num_classes} classes: top-1 {top1:.2f} %{top5_text}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from dinocli.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr)


def _print_report(report, output: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    held = f" ({report.num_holdout} held out)" if report.num_holdout else ""
    title = (
        f"linear ({report.mode}): {report.num_train} train{held}, {report.num_val} val, {report.num_classes} classes, "
        f"{report.epochs} epochs, {report.device} {report.precision}, {report.seconds:.2f} s"
    )
    if report.sweep:
        table = Table(title=title)
        for col in ("lr", "weight decay", "held-out top-1 %", "held-out loss", ""):
            table.add_column(col, justify="right")
        for row in report.sweep:
            chosen = row["lr"] == report.lr and row["weight_decay"] == report.weight_decay
            table.add_row(f"{row['lr']:g}", f"{row['weight_decay']:g}", f"{row['holdout_top1']:.2f}",
                          f"{row['holdout_loss']:.4f}", "picked" if chosen else "")  # fmt: skip
        console.print(table)
    else:
        console.print(title)
    top5 = "" if report.top5 is None else f", top-5 {report.top5:.2f} %"
    console.print(f"val top-1 {report.top1:.2f} %{top5} (lr {report.lr:g}, weight decay {report.weight_decay:g})")
    if report.best_top1 is not None:
        console.print(f"best val top-1 over the epochs (what eval_linear.py prints): {report.best_top1:.2f} % "
                      f"at epoch {report.best_epoch}")  # fmt: skip
    if output is not None:
        console.print(f"classifier written to {output}")
