"""``dino export``: a trained backbone as safetensors, TorchScript, ONNX or a Hugging Face folder,
checked against PyTorch.

Python API::

    from dinocli.export import export_backbone
    report = export_backbone("run/checkpoint.pth", "vit_small.safetensors")
    report.max_abs_diff   # largest |exported - PyTorch| on a random batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dinocli.errors import DinoError, UsageError, unknown_name
from dinocli.export.formats import require_onnx, write_onnx, write_safetensors, write_torchscript
from dinocli.export.huggingface import check_exportable, require_transformers, write_huggingface
from dinocli.export.metadata import METADATA_KEYS, export_metadata
from dinocli.io import atomic_folder, atomic_path, check_output_path
from dinocli.weights import build_backbone, read_backbone_weights, resolve_backbone_spec

FORMATS = ("safetensors", "torchscript", "onnx", "huggingface")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_KEYS = ("teacher", "student")
#: the format an output's suffix names (without ``--format``); other suffixes are safetensors.
SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "torchscript", ".ts": "torchscript", ".onnx": "onnx"}
#: Largest accepted |exported - PyTorch fp32|, relative to max(1, largest |output|), per dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}


@dataclass
class ExportReport:
    """What :func:`export_backbone` wrote and how well the written model matches PyTorch."""

    output: Path
    format: str
    dtype: str
    arch: str
    checkpoint_key: str
    n_tensors: int
    n_head_tensors: int
    size_bytes: int
    #: Largest |exported - PyTorch fp32| over every checked batch.
    max_abs_diff: float
    #: (input shape, largest difference) per batch checked; failures of dynamic shapes omitted.
    checks: list[tuple[tuple[int, ...], float]] = field(default_factory=list)
    dynamic_batch: bool = False
    dynamic_image_size: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def export_backbone(
    weights_path: str | Path,
    output: str | Path,
    format: str | None = None,
    checkpoint_key: str = "teacher",
    include_head: bool = False,
    dtype: str = "fp32",
    force: bool = False,
    arch: str | None = None,
    patch_size: int | None = None,
) -> ExportReport:
    """Export the backbone in ``weights_path`` to ``output`` and check it against PyTorch.

    ``weights_path`` is anything :func:`dinocli.load_backbone` reads. The file (for
    ``huggingface``: the folder) is written atomically, and only once the written model has
    passed the check; an existing ``output`` is refused unless ``force``. Without ``format``, the
    output's suffix names it (:data:`SUFFIX_FORMATS`; safetensors for any other).
    """
    format = output_format(Path(output), format)
    if format not in FORMATS:
        raise unknown_name("export format", format, FORMATS)
    if dtype not in DTYPES:
        raise unknown_name("dtype", dtype, DTYPES)
    if checkpoint_key not in CHECKPOINT_KEYS:
        raise unknown_name("checkpoint key", checkpoint_key, CHECKPOINT_KEYS)
    source, output = Path(weights_path), Path(output)
    folder = format == "huggingface"
    check_output_path(output, "--output", folder=folder, inputs=[("--weights", source)])  # before any work
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it")
    if include_head and format != "safetensors":
        raise UsageError(f"--include-head applies to safetensors exports only, not {format}")
    if format == "onnx":
        require_onnx()  # before any work: say how to install it
    if folder:
        require_transformers()

    weights = read_backbone_weights(source, checkpoint_key)
    if include_head and not weights.head:
        raise UsageError(f"{source} has no head weights to include (it holds a backbone only)")
    spec = resolve_backbone_spec(weights, arch, patch_size)
    model = build_backbone(weights, arch, patch_size).eval()
    metadata = export_metadata(
        weights=weights,
        spec=spec,
        model=model,
        source=source,
        file_format=format,
        dtype=dtype,
        include_head=include_head,
    )
    inputs = _check_inputs(model, int(metadata["crop_size"] or 224))
    if folder:
        check_exportable(model)
        # transformers resizes position embeddings to the exact grid, the reference by a scale
        # factor: the same model only at the training size (docs/export.md).
        inputs = inputs[:2]
    with torch.inference_mode():
        expected = [model(x).float() for x in inputs]

    if folder:
        with atomic_folder(output, replace=force) as tmp:
            run = write_huggingface(tmp, model, metadata, DTYPES[dtype])
            checks = _compare(run, inputs, expected, dtype)
            size = sum(f.stat().st_size for f in tmp.iterdir())
        return _report(output, format, dtype, spec, metadata, model, 0, size, checks)

    with atomic_path(output) as tmp:
        if format == "safetensors":
            run = write_safetensors(tmp, model, weights.head if include_head else {}, metadata, DTYPES[dtype])
        elif format == "torchscript":
            run = write_torchscript(tmp, model, metadata, DTYPES[dtype])
        else:
            run = write_onnx(tmp, model, metadata, DTYPES[dtype])
        checks = _compare(run, inputs, expected, dtype)
        size = tmp.stat().st_size
    n_head = len(weights.head) if include_head else 0
    return _report(output, format, dtype, spec, metadata, model, n_head, size, checks)


def output_format(output: Path, format: str | None) -> str:
    """``format``, or the one ``output``'s suffix names; an error where the two disagree."""
    named = SUFFIX_FORMATS.get(output.suffix.lower())
    if format is None:
        return named or "safetensors"
    if named is not None and named != format and format in FORMATS:
        raise UsageError(
            f"--output {output} names a {named} file but --format is {format}; change the name or the format"
        )
    return format


def _report(output, format, dtype, spec, metadata, model, n_head, size, checks) -> ExportReport:
    shapes = [shape for shape, _ in checks]
    base = shapes[0]  # the first batch always runs
    return ExportReport(
        output=output,
        format=format,
        dtype=dtype,
        arch=spec["name"],
        checkpoint_key=metadata["weights"],
        n_tensors=len(model.state_dict()),
        n_head_tensors=n_head,
        size_bytes=size,
        max_abs_diff=max(diff for _, diff in checks),
        checks=checks,
        dynamic_batch=any(s[0] != base[0] and s[2:] == base[2:] for s in shapes),
        dynamic_image_size=any(s[2:] != base[2:] for s in shapes),
        metadata=metadata,
    )


def _check_inputs(model: nn.Module, crop: int) -> list[torch.Tensor]:
    """A random batch at the training size, then one of another batch size and one of another image size."""
    step = getattr(model, "patch_size", None) or 32
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 3, crop, crop), (3, 3, crop, crop), (1, 3, crop + step, crop + 2 * step)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _compare(run, inputs: list[torch.Tensor], expected: list[torch.Tensor], dtype: str):
    """Run the written file on each batch; the first must match, the others may be unsupported."""
    checks: list[tuple[tuple[int, ...], float]] = []
    for i, (x, want) in enumerate(zip(inputs, expected)):
        try:
            got = run(x)
        except Exception as exc:  # noqa: BLE001 - a fixed-shape export refusing another shape
            if i == 0:
                if isinstance(exc, DinoError):
                    raise
                raise DinoError(f"the exported model failed to run: {type(exc).__name__}: {exc}") from exc
            continue
        if got.shape != want.shape:
            raise DinoError(
                f"the exported model returns shape {list(got.shape)}, PyTorch {list(want.shape)}"
            )
        diff = (got - want).abs().max().item()
        limit = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        if not diff <= limit:  # also catches NaN
            raise DinoError(
                f"the exported model differs from PyTorch by {diff:.3g} on a {list(x.shape)} batch "
                f"(more than {limit:.3g} for {dtype}); nothing was written"
            )
        checks.append((tuple(x.shape), diff))
    return checks


__all__ = [
    "CHECKPOINT_KEYS",
    "DTYPES",
    "FORMATS",
    "METADATA_KEYS",
    "ExportReport",
    "export_backbone",
]
