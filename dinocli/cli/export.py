"""``dino export``: a trained backbone as safetensors, TorchScript, ONNX or a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinocli.cli.app import command
from dinocli.cli.options import Arch, CheckpointKey, PatchSize


@command(
    name="export",
    rich_help_panel="Models",
    short_help="A backbone as a file to ship, checked against PyTorch before it is written.",
    examples=(
        "dino export --weights runs/vits16/checkpoint.pth --output vits16.safetensors",
        "dino export --weights runs/vits16/checkpoint.pth --format onnx --output vits16.onnx",
        "dino export --weights runs/vits16/checkpoint.pth --format huggingface --output vits16-hf",
    ),
)
def export_command(
    weights: Annotated[
        Path,
        typer.Option(
            "--weights", "-w", help="Training checkpoint, reference .pth, safetensors, TorchScript export or Hugging Face folder."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (a folder for huggingface).")],
    file_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="safetensors, torchscript, onnx or huggingface \\[default: from the suffix (.pt, .ts: torchscript; "
            ".onnx), else safetensors].",
        ),
    ] = None,
    checkpoint_key: CheckpointKey = "teacher",
    include_head: Annotated[
        bool, typer.Option("--include-head", help="Also store the projection head (safetensors only).")
    ] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16 (ONNX: fp32 or fp16).")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    arch: Arch = None,
    patch_size: PatchSize = None,
) -> None:
    """Export a backbone as safetensors, TorchScript, ONNX or a Hugging Face folder, checked against PyTorch
    before it is written.

    safetensors: the reference key layout plus metadata; dinocli.load_backbone(OUTPUT) needs no --arch.

    TorchScript and ONNX: normalised images [B, 3, H, W] -> CLS embedding, any batch and image size.

    huggingface (ViTs; needs transformers): a folder that transformers.ViTModel.from_pretrained loads,
    with a model card; dinocli reads it back as --weights.
    """
    from dinocli.export import export_backbone

    report = export_backbone(
        weights,
        output,
        format=file_format,
        checkpoint_key=checkpoint_key,
        include_head=include_head,
        dtype=dtype,
        force=force,
        arch=arch,
        patch_size=patch_size,
    )
    head = f" + {report.n_head_tensors} head tensors" if report.n_head_tensors else ""
    which = f", {report.checkpoint_key} weights" if report.checkpoint_key else ""
    typer.echo(
        f"wrote {report.output} ({report.format}, {report.dtype}, {report.arch}{which}, "
        f"{report.n_tensors} backbone tensors{head}, {report.size_bytes / 1e6:.1f} MB)"
    )
    shapes = ", ".join("x".join(map(str, shape)) for shape, _ in report.checks)
    typer.echo(
        f"check: largest |difference| from PyTorch {report.max_abs_diff:.3g} on random batches {shapes}"
    )
    dynamic = [name for name, ok in (("batch", report.dynamic_batch), ("image size", report.dynamic_image_size)) if ok]
    if report.format in ("torchscript", "onnx"):
        typer.echo(f"dynamic: {', '.join(dynamic) if dynamic else 'none (fixed input shape)'}")
