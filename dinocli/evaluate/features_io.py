"""Frozen features of an image set, and their safetensors file.

The file holds two tensors, ``features`` ``[N, D]`` (float32 or float16) and ``labels`` ``[N]``
(int64, -1 for images outside class folders), and string metadata: ``classes`` (a JSON list),
``paths`` (a JSON list of image paths relative to the data folder, or ``paths_file`` naming a
sidecar text file for large sets) and ``dinocli.features`` (a JSON object: backbone, weights file
and its sha256, the sha256 of the backbone's tensors, preprocessing, precision), plus ``dinocli.version``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dinocli.errors import UsageError
from dinocli.io import atomic_path, atomic_write_text

#: metadata key of the JSON object describing how the features were made.
FEATURES_META_KEY = "dinocli.features"
#: above this many images the relative paths go to a sidecar file, not the safetensors header.
MAX_PATHS_IN_HEADER = 100_000
_STORABLE_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass
class Features:
    """Features ``[N, D]`` of ``N`` images with their labels (-1 when unlabelled)."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise UsageError(f"features must be [N, D], got shape {list(self.features.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if self.labels.shape[0] != self.features.shape[0]:
            raise UsageError(
                f"{self.features.shape[0]} features but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """The feature dimension ``D``."""
        return int(self.features.shape[1])

    @property
    def labelled(self) -> bool:
        """Whether every image has a class label (none is -1)."""
        return len(self) > 0 and bool((self.labels >= 0).all())


def save_features(path: str | Path, feats: Features, dtype: torch.dtype = torch.float32) -> None:
    """Write ``feats`` to ``path`` (safetensors) atomically, the tensors stored as ``dtype``."""
    if dtype not in _STORABLE_DTYPES:
        raise UsageError(f"features can be stored as float32 or float16, not {dtype}")
    path = Path(path)
    meta = {
        "classes": json.dumps(list(feats.classes)),
        FEATURES_META_KEY: json.dumps(feats.metadata, sort_keys=True),
        "dinocli.version": _version(),
    }
    if len(feats.paths) > MAX_PATHS_IN_HEADER:
        sidecar = path.with_name(path.name + ".paths.txt")
        atomic_write_text(sidecar, "".join(p + "\n" for p in feats.paths))
        meta["paths_file"] = sidecar.name
    else:
        meta["paths"] = json.dumps(list(feats.paths))
    tensors = {
        "features": feats.features.detach().to("cpu", dtype).contiguous(),
        "labels": feats.labels.detach().to("cpu", torch.int64).contiguous(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_features(path: str | Path) -> Features:
    """Read a features file written by :func:`save_features` (``dino extract``)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"features file not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a features file")
    if _is_torch_file(path):
        raise UsageError(f"{path} is a PyTorch checkpoint, not a features file: {_WEIGHTS_HINT}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            if not keys & {"features", "labels"}:
                raise UsageError(f"{path} holds {len(keys)} other tensors, not features: {_WEIGHTS_HINT}")
            if not {"features", "labels"} <= keys:
                raise UsageError(
                    f"{path} is not a dinocli features file: it lacks the "
                    f"{' and '.join(sorted({'features', 'labels'} - keys))} tensor "
                    "(write one with 'dino extract')"
                )
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid safetensors features file: {exc}") from None
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise UsageError(
            f"{path}: features {list(features.shape)} and labels {list(labels.shape)} do not "
            "form an [N, D] / [N] pair"
        )
    classes = _json(meta.get("classes", "[]"), path, "classes")
    _require_labels_in(labels, classes, path)
    if "paths_file" in meta:
        sidecar = path.with_name(meta["paths_file"])
        if not sidecar.is_file():
            raise UsageError(f"{path}: its image-path sidecar {sidecar} is missing")
        paths = sidecar.read_text(encoding="utf-8").splitlines()
    else:
        paths = _json(meta.get("paths", "[]"), path, "paths")
    info = _json(meta.get(FEATURES_META_KEY, "{}"), path, FEATURES_META_KEY)
    if "dinocli.version" in meta:
        info.setdefault("dinocli_version", meta["dinocli.version"])
    return Features(features, labels.to(torch.int64), list(classes), list(paths), info)


_WEIGHTS_HINT = (
    "give weights as --weights (with --train-data/--val-data), or write features with 'dino extract'"
)


def _require_labels_in(labels: torch.Tensor, classes: list[str], path: Path) -> None:
    """Labels are whole numbers from 0 to ``len(classes) - 1`` (any count when the file names no classes),
    or -1 for an image outside the class folders."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"{path}: the labels are {str(labels.dtype).removeprefix('torch.')}, not whole numbers")
    labels = labels.to(torch.int64)
    outside = (labels < -1) | (labels >= len(classes)) if classes else labels < -1
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        allowed = f"0 to {len(classes) - 1} for its {len(classes)} classes" if classes else "0 or more"
        raise UsageError(
            f"{path}: row {row} has label {int(labels[row])}; labels are {allowed}, or -1 for unlabelled"
        )


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file (a zip archive or a legacy pickle) and not
    like safetensors."""
    from dinocli.weights import is_safetensors, is_torch_save

    try:
        return not is_safetensors(path) and is_torch_save(path)
    except OSError:
        return False


def require_same_classes(train: list[str], val: list[str]) -> None:
    """A one-line error unless the train and val class names (where both have them) are the same list."""
    if not train or not val or list(train) == list(val):
        return
    first = next((i for i, (a, b) in enumerate(zip(train, val)) if a != b), None)
    if first is not None:
        where = f"class {first} is {train[first]!r} in train and {val[first]!r} in val"
    else:
        longer, name = (train, "train") if len(train) > len(val) else (val, "val")
        where = f"only {name} has {longer[min(len(train), len(val))]!r}"
    raise UsageError(f"the train and val sets have different classes ({len(train)} vs {len(val)}: {where})")


def model_difference(first: dict[str, Any], second: dict[str, Any]) -> str | None:
    """How two features' metadata (or a classifier's) name different networks or token options,
    or ``None`` where they agree or do not say (files from before this metadata)."""
    names = f": {first.get('weights')} vs {second.get('weights')}" if first.get("weights") else ""
    if "backbone_sha256" in first and "backbone_sha256" in second:  # the tensors, in whatever file
        a, b = first["backbone_sha256"], second["backbone_sha256"]
        if a != b:
            return f"different backbone weights (sha256 {a[:12]} vs {b[:12]}{names})"
        keys: tuple[str, ...] = ()
    elif "weights_sha256" in first and "weights_sha256" in second:  # files from before backbone_sha256
        a, b = first["weights_sha256"], second["weights_sha256"]
        if a != b:
            return f"different weights files (sha256 {a[:12]} vs {b[:12]}{names})"
        keys = ("checkpoint_key",)
    elif "weights" in first and "weights" in second and first["weights"] != second["weights"]:
        return f"weights {first['weights'] or 'none'} vs {second['weights'] or 'none'}"  # one has no weights file
    else:
        keys = ("backbone", "seed")
    for key in (*keys, "n_last_blocks", "avgpool_patch_tokens"):
        if key in first and key in second and first[key] != second[key]:
            return f"{key.replace('_', ' ')} {_brief(first[key])} vs {_brief(second[key])}"
    return None


def require_same_model(train: Features, val: Features) -> None:
    """A one-line error where the train and val features come from different networks, checkpoint
    keys or token options: their accuracy would compare two unrelated feature spaces."""
    difference = model_difference(train.metadata, val.metadata)
    if difference is not None:
        raise UsageError(
            f"the train and val features were extracted differently ({difference}); "
            "extract both with the same --weights and options"
        )


def preprocessing_difference(first: dict[str, Any], second: dict[str, Any]) -> str | None:
    """How two features' metadata (or a classifier's) differ in preprocessing (resize, crop,
    interpolation), or ``None``."""
    a, b = first.get("preprocessing"), second.get("preprocessing")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    changed = [f"{k} {a[k]} vs {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return ", ".join(changed) or None


def _brief(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        kwargs = value.get("kwargs") or {}
        inner = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        return f"{value['name']}({inner})"
    return str(value)


def _json(text: str, path: Path, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"{path}: metadata {key!r} is not valid JSON") from None


def _version() -> str:
    from dinocli import __version__

    return __version__
