"""What an export records about its backbone and where it came from: a flat ``str -> str`` dict.

The same dict is the safetensors header metadata, the ``dinocli.json`` extra file of a
TorchScript archive and the ``metadata_props`` of an ONNX model (see docs/export.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from dinocli.weights import BACKBONE_SPEC_KEY, BackboneWeights

#: The normalisation of the reference implementation (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Every key an export's metadata has, besides :data:`dinocli.weights.BACKBONE_SPEC_KEY`.
METADATA_KEYS = (
    "format",
    "arch",
    "backbone_plugin",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "crop_size",
    "mean",
    "std",
    "weights",
    "epoch",
    "source_file",
    "source_sha256",
    "config",
    "plugins",
    "dinocli_version",
    "dtype",
    "include_head",
)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_config(weights: BackboneWeights) -> dict[str, Any]:
    """The training configuration the source file carries (dinocli's ``config``, the reference's ``args``)."""
    meta = weights.metadata
    config = meta.get("config")
    if isinstance(config, str):  # a dinocli export: JSON text
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            config = None
    if isinstance(config, dict):
        return config
    args = meta.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return {}


def export_metadata(
    *,
    weights: BackboneWeights,
    spec: dict[str, Any],
    model: nn.Module,
    source: Path,
    file_format: str,
    dtype: str,
    include_head: bool,
) -> dict[str, str]:
    """The metadata of an export of ``model`` (built from ``weights`` by ``spec``) read from ``source``."""
    from dinocli import __version__
    from dinocli.registry import get_registry

    registry = get_registry()
    meta = weights.metadata
    config = source_config(weights)
    kwargs = spec.get("kwargs", {})
    carried = meta if all(isinstance(v, str) for v in meta.values()) else {}  # a dinocli export

    crop = config.get("global_crop_size") or carried.get("crop_size") or kwargs.get("img_size")
    if crop is None and isinstance(meta.get("args"), argparse.Namespace):
        crop = 224  # the reference's global crops are always 224 pixels
    mean = config.get("mean") or _json_or(carried.get("mean"), IMAGENET_MEAN)
    std = config.get("std") or _json_or(carried.get("std"), IMAGENET_STD)
    which = weights.checkpoint_key or carried.get("weights", "")
    epoch = meta.get("epoch", "")
    blocks = getattr(model, "blocks", None)
    plugins = [
        {"name": info.name, "distribution": info.distribution, "version": info.version}
        for info in sorted(registry.plugins.values(), key=lambda i: i.name)
        if info.error is None
    ]
    try:
        backbone_plugin = registry.get("backbones", spec["name"]).plugin
    except Exception:  # noqa: BLE001 - the model was built, so this only happens for odd registries
        backbone_plugin = ""
    values: dict[str, Any] = {
        BACKBONE_SPEC_KEY: json.dumps({"name": spec["name"], "kwargs": kwargs}, sort_keys=True),
        "format": file_format,
        "arch": spec["name"],
        "backbone_plugin": backbone_plugin,
        "patch_size": getattr(model, "patch_size", None),
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": len(blocks) if blocks is not None else None,
        "num_heads": getattr(model, "num_heads", None),
        "crop_size": crop,
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "weights": which,
        "epoch": epoch,
        "source_file": source.name,
        "source_sha256": sha256_of(source if source.is_file() else source / "model.safetensors"),
        "config": json.dumps(config, sort_keys=True, default=str),
        "plugins": json.dumps(plugins),
        "dinocli_version": __version__,
        "dtype": dtype,
        "include_head": "true" if include_head else "false",
    }
    return {key: "" if value is None else str(value) for key, value in values.items()}


def _json_or(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default
