"""``dino extract``: frozen features of an image folder, written to a safetensors file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from dinocli.cli.app import command
from dinocli.cli.options import Arch, CheckpointKey, Device, PatchSize, Precision
from dinocli.errors import UsageError
from dinocli.io import check_output_path

PANEL = "Evaluate"

# Options shared with ``dino knn``'s one-step form.
Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help="Checkpoint or exported backbone (anything load_backbone reads).",
        rich_help_panel="Model",
    ),
]
RandomInit = Annotated[
    bool,
    typer.Option("--random-init", help="Evaluate a randomly initialised --arch (a baseline).", rich_help_panel="Model"),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of --random-init.", rich_help_panel="Model")]
PatchEmbedding = Annotated[
    str | None,
    typer.Option(
        "--patch-embed", help="With --random-init: the ViT's patch embedding, linear or conv.", rich_help_panel="Model"
    ),
]
Pooling = Annotated[
    str | None,
    typer.Option(
        "--pool",
        help="With --random-init: the ViT's embedding, cls (CLS token) or avg (mean patch token).",
        rich_help_panel="Model",
    ),
]
Depth = Annotated[
    int | None,
    typer.Option(
        "--depth",
        help="With --random-init: the ViT's number of blocks (default: the architecture's).",
        rich_help_panel="Model",
    ),
]
RawPixels = Annotated[
    bool,
    typer.Option(
        "--raw-pixels", help="No network: the flattened normalised crop (a baseline).", rich_help_panel="Model"
    ),
]
Resize = Annotated[
    int, typer.Option("--resize", help="Resize the shorter side to this many pixels.", rich_help_panel="Preprocessing")
]
CropSize = Annotated[
    int, typer.Option("--crop-size", help="Center crop of this size.", rich_help_panel="Preprocessing")
]
Interpolation = Annotated[
    str,
    typer.Option(
        "--interpolation", help="Resize filter: bicubic, bilinear, nearest or lanczos.", rich_help_panel="Preprocessing"
    ),
]
NLastBlocks = Annotated[
    int,
    typer.Option(
        "--n-last-blocks", help="Concatenate the CLS tokens of the last K blocks (ViT).", rich_help_panel="Features"
    ),
]
AvgPool = Annotated[
    bool,
    typer.Option(
        "--avgpool-patch-tokens",
        help="Append the mean patch token of the last block (ViT).",
        rich_help_panel="Features",
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", "-b", help="Images per forward pass.", rich_help_panel="Performance")
]
NumWorkers = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        help="Image-decoding processes \\[default: cores - 1, at most 8].",
        rich_help_panel="Performance",
    ),
]

# The two input forms of ``dino knn`` and ``dino linear``: features files, or image folders to extract first.
TrainFeatures = Annotated[Path | None, typer.Option("--train", help="Train features (from 'dino extract').")]
ValFeatures = Annotated[Path | None, typer.Option("--val", help="Val features (from 'dino extract').")]
TrainData = Annotated[
    Path | None,
    typer.Option("--train-data", help="One-step form: train image folder (or tar shards) to extract first."),
]
ValData = Annotated[
    Path | None, typer.Option("--val-data", help="One-step form: val image folder (or tar shards) to extract first.")
]


def input_form(train: Path | None, val: Path | None, train_data: Path | None, val_data: Path | None) -> str | None:
    """``"files"`` (``--train``/``--val``), ``"images"`` (``--train-data``/``--val-data``) or ``None``
    (neither); a one-line error for a mix of the two forms or half a pair, a warning where train and
    val are the same data."""
    from_files = train is not None or val is not None
    from_images = train_data is not None or val_data is not None
    if from_files and from_images:
        raise UsageError("give either --train/--val (features files) or --train-data/--val-data (image folders)")
    if from_files and (train is None or val is None):
        raise UsageError("give both --train and --val features files")
    if from_images and (train_data is None or val_data is None):
        raise UsageError("give both --train-data and --val-data image folders")
    first, second, flags = (train, val, "--train and --val") if from_files else (
        train_data, val_data, "--train-data and --val-data"
    )
    if first is not None and Path(first).resolve() == Path(second).resolve():
        typer.echo(
            f"warning: {flags} name the same data: the accuracy is measured on the training images, "
            "not on held-out ones",
            err=True,
        )
    return "files" if from_files else "images" if from_images else None


def load_feature_pair(train: Path, val: Path) -> tuple[Any, Any]:
    """The train and val features files, read; a warning where they are of the same images, or where
    their preprocessing differs."""
    from dinocli.evaluate.features_io import load_features, preprocessing_difference

    train_feats, val_feats = load_features(train), load_features(val)
    data = train_feats.metadata.get("data")
    if data is not None and data == val_feats.metadata.get("data") and Path(train).resolve() != Path(val).resolve():
        typer.echo(
            f"warning: --train and --val are features of the same images ({data}): the accuracy is measured "
            "on the training images, not on held-out ones",
            err=True,
        )
    difference = preprocessing_difference(train_feats.metadata, val_feats.metadata)
    if difference is not None:
        typer.echo(f"warning: the train and val features were preprocessed differently ({difference})", err=True)
    return train_feats, val_feats


@command(
    name="extract",
    rich_help_panel=PANEL,
    short_help="Frozen features of a labelled image folder, as a safetensors file.",
    examples=(
        "dino extract --weights runs/vits16/checkpoint.pth --data DIR/train --output train.safetensors",
        "dino extract --random-init --arch vit_small --data DIR/val --output val-random.safetensors",
    ),
)
def extract_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            "-d",
            help="Image folder (<class>/<image> or any tree) or tar shards (s-{000..099}.tar, a .tar, a folder of .tar).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Features file to write (.safetensors).")],
    weights: Weights = None,
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
    dtype: Annotated[
        str, typer.Option("--dtype", help="Stored dtype: fp32 or fp16 (half the size).", rich_help_panel="Features")
    ] = "fp32",
    batch_size: BatchSize = 64,
    num_workers: NumWorkers = None,
    precision: Precision = "auto",
    device: Device = "auto",
) -> None:
    """Extract frozen features of every image in a folder (labels from its class folders)."""
    import torch

    from dinocli.evaluate.features_io import FEATURES_META_KEY, save_features
    from dinocli.io import has_safetensors_metadata

    # fp32/fp16 as in --precision and 'dino export --dtype'; float32/float16 kept from earlier versions
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "float32": torch.float32, "float16": torch.float16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    features_file = ("a features file", has_safetensors_metadata(FEATURES_META_KEY))
    check_output_path(output, "--output", inputs=[("--weights", weights)], replaces=features_file)
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
    images = check_before_loading(data, options)
    model, info = load_model(
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
    start = time.perf_counter()
    feats = extract_with_progress(model, data, images=images, **options)
    seconds = time.perf_counter() - start
    feats.metadata.update(info)
    save_features(output, feats, dtypes[dtype])
    n = len(feats.classes)
    classes = f"{n} class{'es' if n != 1 else ''}" if n else "unlabelled"
    typer.echo(
        f"wrote {len(feats)} x {feats.dim} features ({classes}) to {output} "
        f"in {seconds:.1f} s ({len(feats) / seconds:.0f} images/s)"
    )


def load_model(
    weights: Path | None,
    checkpoint_key: str,
    arch: str | None,
    patch_size: int | None,
    random_init: bool,
    raw_pixels: bool,
    crop_size: int,
    seed: int,
    patch_embed: str | None = None,
    pool: str | None = None,
    depth: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The backbone named by the CLI options, and its description for the features file."""
    from dinocli.evaluate.extract import backbone_for_eval

    return backbone_for_eval(
        weights,
        checkpoint_key=checkpoint_key,
        arch=arch,
        patch_size=patch_size,
        random_init=random_init,
        raw_pixels=raw_pixels,
        img_size=crop_size,
        seed=seed,
        patch_embed=patch_embed,
        pool=pool,
        depth=depth,
    )


def check_before_loading(data: Path, options: dict[str, Any]) -> tuple[list[Path], list[int], list[str]]:
    """Check the data and options before the (slow) model load; returns ``list_labelled_images(data)``."""
    from dinocli.data import list_labelled_images
    from dinocli.evaluate.extract import check_options
    from dinocli.runtime import resolve_device, resolve_precision

    check_options(
        options["resize"],
        options["crop_size"],
        options["interpolation"],
        options["batch_size"],
        options["num_workers"] or 0,
    )
    resolve_precision(options["precision"], resolve_device(options["device"]))
    images = list_labelled_images(data)
    _warn_loose_images(Path(data), images[0], labelled=bool(images[2]))
    return images


def _warn_loose_images(root: Path, paths: list[Any], labelled: bool) -> None:
    """Warn where images directly in ``root`` beside class folders leave every image unlabelled."""
    if labelled or not root.is_dir():
        return
    loose = [p for p in paths if isinstance(p, Path) and p.parent == root]
    if loose and len(loose) < len(paths):
        typer.echo(
            f"warning: {len(loose)} image(s) lie directly in {root} (e.g. {loose[0].name}), outside its class "
            "folders, so no image gets a label; move them into a class folder (or out) for labelled features",
            err=True,
        )


def extract_with_progress(
    model: Any,
    data: Path,
    *,
    num_workers: int | None,
    images: tuple[list[Path], list[int], list[str]] | None = None,
    **options: Any,
) -> Any:
    """:func:`dinocli.evaluate.extract_folder` with a progress bar (images/s) on stderr."""
    from dinocli.data import list_labelled_images
    from dinocli.evaluate.extract import default_num_workers, extract_features

    paths, labels, classes = images if images is not None else list_labelled_images(data)
    workers = default_num_workers() if num_workers is None else num_workers
    workers = min(workers, max(0, (len(paths) - 1) // max(1, options.get("batch_size", 1))))
    with progress_bar(f"extracting {data}", len(paths)) as advance:
        return extract_features(
            model, paths, labels, classes=classes, root=data, num_workers=workers, progress=advance, **options
        )


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr with an images/s column; yields ``advance(n)``.

    Shown on a terminal only, so that logs and errors stay clean when stderr is redirected.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda n: None
        return

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.0f} images/s" if speed else "")

        yield advance
