"""Reading weights safely, in every format dinocli knows. The one place that calls ``torch.load``.

Formats: safetensors files (dinocli exports, any backbone state dict); TorchScript archives
written by ``dino export`` (their tensors only: read without ``torch.jit.load``, so none of
their TorchScript code is compiled or run); PyTorch files: the
reference implementation's full training checkpoints (``teacher``/``student`` sub-dicts with
``module.`` and ``backbone.`` prefixes and a pickled ``argparse.Namespace``), its released
backbone-only state dicts, and dinocli's own checkpoints; Hugging Face ``ViTModel`` folders
(``config.json`` + ``model.safetensors``, see :mod:`dinocli.export.huggingface`). Pickles are opened with
``weights_only=True``: a file that needs any Python object beyond tensors, containers and
``argparse.Namespace`` is refused, and its code never runs.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from torch import nn

from dinocli.errors import DinoError, UsageError

#: safetensors metadata key / checkpoint entry naming the backbone: {"name": ..., "kwargs": {...}}.
BACKBONE_SPEC_KEY = "dinocli.backbone"
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


@dataclass
class BackboneWeights:
    """A backbone's tensors in the reference layout, the head's, and what the file says of them."""

    state_dict: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint entry the tensors came from (``teacher``/``student``), when there was one.
    checkpoint_key: str | None = None


def torch_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus ``argparse.Namespace``), on the CPU."""
    path = _existing(path)
    _require_torch_save(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a file that is read is fine and one that is not is one error line: no warning besides
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise DinoError(
                f"refusing to load {path}: it needs the Python object {found.group(1)!r}, which "
                "could run code; only tensors, containers and argparse.Namespace are allowed"
            ) from None
        raise UsageError(
            f"{path} is not a PyTorch checkpoint dinocli can read (not a valid weights-only pickle)"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        # PyTorch's zip reader appends a paragraph of advice to its first sentence: keep the sentence
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted): {reason}") from None
    except Exception as exc:  # noqa: BLE001 - malformed pickles raise anything (IndexError, struct.error)
        raise UsageError(
            f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}"
        ) from None


def is_torch_save(path: Path) -> bool:
    """Whether ``path`` starts as a ``torch.save`` output: a zip archive, or a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _require_torch_save(path: Path) -> None:
    """Refuse a file that cannot be a ``torch.save`` output before PyTorch reads it (its errors say less)."""
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty, not a PyTorch checkpoint")
    if not is_torch_save(path):
        raise UsageError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle")


def read_backbone_weights(path: str | Path, checkpoint_key: str = "teacher") -> BackboneWeights:
    """The backbone (and head) tensors of any weights file, with prefixes stripped."""
    from dinocli.export.huggingface import is_huggingface_folder, read_huggingface_folder

    if is_huggingface_folder(Path(path)):
        _one_network(path, checkpoint_key)
        state, meta, spec = read_huggingface_folder(Path(path))
        return BackboneWeights(state, {}, spec, meta)
    path = _existing(path)
    if is_safetensors(path) or _is_torchscript(path):
        _one_network(path, checkpoint_key)
    if is_safetensors(path):
        tensors, meta = _read_safetensors(path)
        spec = json.loads(meta[BACKBONE_SPEC_KEY]) if BACKBONE_SPEC_KEY in meta else None
        backbone, head = _split(tensors)
        return BackboneWeights(backbone, head, spec, meta)
    if _is_torchscript(path):
        tensors, meta = _read_torchscript(path)
        spec = json.loads(meta[BACKBONE_SPEC_KEY]) if BACKBONE_SPEC_KEY in meta else None
        backbone, head = _split(tensors)
        return BackboneWeights(backbone, head, spec, meta)
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    metadata: dict[str, Any] = {}
    spec = obj.get(BACKBONE_SPEC_KEY)
    if checkpoint_key in obj and isinstance(obj[checkpoint_key], dict):
        metadata = {k: v for k, v in obj.items() if not isinstance(v, dict) or k == "config"}
        state = obj[checkpoint_key]
    elif _all_tensors(obj):
        _one_network(path, checkpoint_key)
        state = obj
    else:
        subdicts = sorted(k for k, v in obj.items() if isinstance(v, dict) and _all_tensors(v))
        hint = f" It has: {', '.join(subdicts)}; choose one with --checkpoint-key." if subdicts else ""
        raise UsageError(f"{path} has no {checkpoint_key!r} weights.{hint}")
    if not _all_tensors(state):
        raise UsageError(f"{path}: the {checkpoint_key!r} entry is not a state dict of tensors")
    backbone, head = _split(state)
    used_key = checkpoint_key if state is not obj else None
    return BackboneWeights(backbone, head, spec, metadata, used_key)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """The hex sha256 of a state dict's names, dtypes, shapes and values: the same for the same
    weights in any file format."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _one_network(path: str | Path, checkpoint_key: str) -> None:
    """A file that holds one network has no student: asking for it is an error, not ignored."""
    if checkpoint_key != "teacher":
        raise UsageError(
            f"{path} holds one network, not a training checkpoint with teacher and student: "
            f"drop --checkpoint-key {checkpoint_key}"
        )


def build_backbone(
    weights: BackboneWeights, arch: str | None = None, patch_size: int | None = None
) -> nn.Module:
    """A backbone built for ``weights`` (named by the file, by ``arch`` or inferred) and loaded strictly."""
    from dinocli.registry import create_backbone

    spec = resolve_backbone_spec(weights, arch, patch_size)
    if arch is None and weights.spec:
        _require_registered(spec["name"])
    model = create_backbone(spec["name"], **spec["kwargs"])
    load_state_dict_strict(model, weights.state_dict, what=spec["name"])
    return model


def _require_registered(name: str) -> None:
    """A backbone named by a weights file must be one an installed plugin provides."""
    from dinocli.registry import get_registry

    try:
        get_registry().get("backbones", name)
    except UsageError as exc:
        failed = str(exc).partition(" Disabled by errors: ")[2]
        raise UsageError(
            f"these weights were saved from backbone {name!r}, which no installed plugin provides; "
            "install the plugin that provides it (see 'dino plugins')"
            + (f". Disabled by errors: {failed}" if failed else "")
        ) from None


def resolve_backbone_spec(
    weights: BackboneWeights, arch: str | None = None, patch_size: int | None = None
) -> dict[str, Any]:
    """``{"name", "kwargs"}`` that :func:`build_backbone` uses: the file's, inferred, or overridden.

    With ``arch``, weights of a layout no built-in backbone has (a plugin's) are built by ``arch``
    with its own defaults."""
    if weights.spec:
        spec = dict(weights.spec)
    else:
        try:
            spec = infer_backbone_spec(weights.state_dict)
        except UsageError:
            if arch is None:
                raise
            spec = {"name": arch, "kwargs": {}}
    kwargs = dict(spec.get("kwargs", {}))
    if arch is not None:
        spec["name"] = arch
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return {"name": spec["name"], "kwargs": kwargs}


def load_backbone(
    path: str | Path,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
) -> nn.Module:
    """The backbone stored in ``path``, in eval mode, on the CPU.

    Reads every format dinocli knows (see the module docstring). The architecture and patch
    size come from the file's metadata or are inferred from the tensors when not given.
    """
    weights = read_backbone_weights(path, checkpoint_key)
    return build_backbone(weights, arch, patch_size).eval()


def infer_backbone_spec(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of the built-in backbone whose layout the tensors have."""
    from dinocli.backbones.resnet import RESNETS
    from dinocli.backbones.vit import VIT_ARCHS

    stem_convs = [  # a convolutional stem's 3x3 convolutions: patch_embed.proj.{i}.weight
        k for k, v in state_dict.items() if re.fullmatch(r"patch_embed\.proj\.\d+\.weight", k)
        and v.ndim == 4 and v.shape[-1] == 3
    ]
    if "cls_token" in state_dict and ("patch_embed.proj.weight" in state_dict or stem_convs):
        dim = state_dict["cls_token"].shape[-1]
        blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
        depth = len(blocks)
        if stem_convs:  # a convolutional stem: one stride-2 convolution per halving
            patch, embed = 2 ** len(stem_convs), "conv"
        else:
            patch, embed = state_dict["patch_embed.proj.weight"].shape[-1], "linear"
        n_patches = state_dict["pos_embed"].shape[1] - 1 if "pos_embed" in state_dict else 0
        side = math.isqrt(n_patches)
        for name, (d, layers, _) in VIT_ARCHS.items():
            # the width names the architecture; another depth (blocks 0..N-1) is a kwarg
            if d == dim and blocks == {str(i) for i in range(depth)}:
                kwargs = {"patch_size": patch, "img_size": side * patch, "patch_embed": embed}
                if depth != layers:
                    kwargs["depth"] = depth
                return {"name": name, "kwargs": kwargs}
        raise UsageError(
            f"these ViT weights ({dim} wide, {depth} deep) match no built-in ViT; pass --arch"
        )
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        blocks = tuple(
            len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")})
            for i in range(1, 5)
        )
        bottleneck = "layer1.0.conv3.weight" in state_dict
        layouts = {
            ((2, 2, 2, 2), False): "resnet18",
            ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50",
            ((3, 4, 23, 3), True): "resnet101",
            ((3, 8, 36, 3), True): "resnet152",
        }
        name = layouts.get((blocks, bottleneck))
        if name in RESNETS:
            stem = "small" if state_dict["conv1.weight"].shape[-1] == 3 else "imagenet"
            return {"name": name, "kwargs": {"stem": stem}}
    raise UsageError("cannot tell which backbone these weights belong to; pass --arch")


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load with strict key and shape checking; the error names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise UsageError(f"the weights do not fit {what}: {'; '.join(parts)}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise UsageError(
                f"the weights do not fit {what}: {key!r} has shape {list(tensor.shape)} in the "
                f"file but {list(own[key].shape)} in the model"
            )
    model.load_state_dict(state_dict, strict=True)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"weights file not found: {path}")
    if path.is_dir():
        raise UsageError(
            f"{path} is a folder, not a weights file (nor a Hugging Face folder with config.json and model.safetensors)"
        )
    return path


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file: an 8-byte header length, then its JSON ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _other_dinocli_file(meta: dict[str, str]) -> str | None:
    """What a safetensors file is, by its metadata, when it is one of the other files dinocli writes."""
    from dinocli.evaluate.features_io import FEATURES_META_KEY
    from dinocli.evaluate.linear import CLASSIFIER_META_KEY

    if FEATURES_META_KEY in meta:
        return "a features file (from 'dino extract')"
    if CLASSIFIER_META_KEY in meta:
        return "a linear classifier (from 'dino linear')"
    return None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if what := _other_dinocli_file(meta):
                raise UsageError(f"{path} is {what}, not backbone weights")  # before reading its tensors
            return {key: f.get_tensor(key) for key in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid safetensors file: {exc}") from None


#: TorchScript archive: the metadata file ``dino export`` adds and the storage types it may hold.
TORCHSCRIPT_METADATA = "dinocli.json"
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _ScriptObject:
    """Stands in for a TorchScript class while reading an archive: it only keeps its attributes."""

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(flat: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(flat, size, stride, offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl``: tensors, containers and attribute dicts, nothing else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda value: value
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _type: value
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported storage {kind!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)


def _read_torchscript(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a TorchScript archive by attribute path, and its ``dinocli.json`` metadata."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = next(n for n in archive.namelist() if n.endswith("/data.pkl")).rsplit("/", 1)[0]
            order = f"{root}/byteorder"
            if order in archive.namelist() and archive.read(order).strip() not in (b"", b"little"):
                raise UsageError(f"{path}: big-endian TorchScript archives are not supported")
            obj = _TorchScriptUnpickler(archive.read(f"{root}/data.pkl"), archive, root).load()
            extra = f"{root}/extra/{TORCHSCRIPT_METADATA}"
            meta = json.loads(archive.read(extra)) if extra in archive.namelist() else {}
    except pickle.UnpicklingError as exc:
        raise DinoError(
            f"refusing to read {path}: its TorchScript data names the Python object {str(exc)!r}; "
            "only tensors and module attributes are read"
        ) from None
    except (KeyError, StopIteration, ValueError, TypeError, RuntimeError, EOFError,
            zipfile.BadZipFile) as exc:
        raise UsageError(f"{path} is not a readable TorchScript archive: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(obj, "", tensors)
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _ScriptObject):
        for key, value in getattr(obj, "state", {}).items():
            _collect_tensors(value, f"{prefix}{key}.", out)


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip(key)
        if key.startswith("head."):
            head[key[len("head.") :]] = value
        elif key.startswith("fc.") or key == "head":
            continue  # a ResNet's classifier; the reference removes it too
        else:
            backbone[key] = value
    return backbone, head


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _all_tensors(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
