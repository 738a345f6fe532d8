"""A ViT backbone as a Hugging Face ``transformers`` folder (``ViTModel``), and reading one back.

The folder holds ``config.json`` (a ``ViTConfig``), ``model.safetensors`` (the tensors in the
key layout transformers writes, ``encoder.layer.N.attention.attention.query.*`` ...),
``preprocessor_config.json`` (a ``ViTImageProcessor``), ``README.md`` (a model card) and
``dinocli.json`` (the export metadata, so that dinocli rebuilds the exact model). Writing needs
transformers (for the check); reading back needs only safetensors.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dinocli.errors import UsageError

INSTALL_HINT = "Hugging Face export needs transformers: pip install 'dinocli[huggingface]'"
CONFIG, WEIGHTS, METADATA = "config.json", "model.safetensors", "dinocli.json"

#: Our key (per block: ``blocks.N.`` + key) -> transformers' key on disk (``encoder.layer.N.`` + key).
_BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_KEYS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
#: transformers >= 5 names the same tensors differently in memory; a folder may use either layout.
_V5_BLOCK_KEYS = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")


def require_transformers() -> Any:
    """The ``transformers`` module, or a :class:`UsageError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return transformers


def check_exportable(model: nn.Module) -> None:
    """A one-line error unless ``model`` is a ViT that ``ViTModel`` computes exactly."""
    from dinocli.backbones.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UsageError(
            f"--format huggingface needs a ViT backbone (transformers' ViTModel); this is a {type(model).__name__}"
        )
    if model.patch_embed.kind != "linear":
        raise UsageError(
            "--format huggingface cannot express the convolutional patch stem (--patch-embed conv): "
            "ViTModel has a single patch projection; export safetensors instead"
        )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (the reference's) ViT tensors under transformers' on-disk ``ViTModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = tensor
            continue
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if not found:
            raise UsageError(f"--format huggingface: no ViTModel key for the tensor {key!r}")
        block, name, kind = found.groups()
        prefix = f"encoder.layer.{block}."
        if name == "attn.qkv":
            for part, chunk in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.contiguous()
        elif name in _BLOCK_KEYS:
            out[f"{prefix}{_BLOCK_KEYS[name]}.{kind}"] = tensor
        else:
            raise UsageError(f"--format huggingface: no ViTModel key for the tensor {key!r}")
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``ViTModel`` tensors (either layout, pooler dropped) under our keys."""
    top = {hf: ours for ours, hf in _TOP_KEYS.items()}
    block_keys = {hf: ours for ours, hf in _BLOCK_KEYS.items()}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("vit.")  # a ViTForImageClassification's backbone
        if key.startswith(("pooler.", "classifier.")):
            continue
        key = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", key)  # transformers >= 5 in memory
        if key in top:
            out[top[key]] = tensor
            continue
        found = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
        if not found:
            raise UsageError(f"this Hugging Face folder has a tensor dinocli's ViT lacks: {key!r}")
        block, name, kind = found.groups()
        name = _V5_BLOCK_KEYS.get(name, name)
        if name.startswith("attention.attention.") and name.rsplit(".", 1)[1] in _QKV:
            qkv.setdefault(f"blocks.{block}.attn.qkv.{kind}", {})[name.rsplit(".", 1)[1]] = tensor
        elif name in block_keys:
            out[f"blocks.{block}.{block_keys[name]}.{kind}"] = tensor
        else:
            raise UsageError(f"this Hugging Face folder has a tensor dinocli's ViT lacks: {key!r}")
    for key, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise UsageError(f"this Hugging Face folder lacks part of {key!r} (query, key and value)")
        out[key] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def hf_config(model: nn.Module, metadata: dict[str, str]) -> dict[str, Any]:
    """``ViTConfig`` fields for ``model``; DINO's ViT is transformers' ViT with LayerNorm eps 1e-6."""
    blocks = model.blocks
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": model.num_heads,
        "intermediate_size": blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": 3,
        "qkv_bias": blocks[0].attn.qkv.bias is not None,
        "torch_dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[metadata["dtype"]],
    }


def write_huggingface(folder: Path, model: nn.Module, metadata: dict[str, str], dtype: torch.dtype):
    """Write the folder (see the module docstring) for a ``model`` that passed :func:`check_exportable`;
    return a function that runs the folder in transformers."""
    transformers = require_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: t.detach().cpu().to(dtype).contiguous() for key, t in to_hf_state_dict(model.state_dict()).items()
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = hf_config(model, metadata)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor(metadata), indent=2) + "\n")
    (folder / "README.md").write_text(model_card(metadata, model.pool))

    with _no_progress_bar(transformers):  # its "Loading weights" bar would mix with dinocli's output
        loaded = transformers.ViTModel.from_pretrained(str(folder), add_pooling_layer=False).to(dtype).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        interpolate = tuple(x.shape[-2:]) != (model.img_size, model.img_size)
        with torch.inference_mode():
            tokens = loaded(pixel_values=x.to(dtype), interpolate_pos_encoding=interpolate).last_hidden_state
        return hf_embedding(tokens, model.pool).float()

    return run


@contextlib.contextmanager
def _no_progress_bar(transformers: Any) -> Iterator[None]:
    """transformers without its progress bars, as they were set before afterwards."""
    logging = transformers.utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def hf_embedding(last_hidden_state: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """dinocli's embedding from ``ViTModel``'s ``last_hidden_state`` (the tokens after the final norm)."""
    return last_hidden_state[:, 1:].mean(dim=1) if pool == "avg" else last_hidden_state[:, 0]


def is_huggingface_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_huggingface_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any] | None]:
    """Our tensors, the metadata and the backbone spec of a folder written by us or by transformers."""
    from dinocli.weights import BACKBONE_SPEC_KEY, _read_safetensors

    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path / CONFIG} is not readable JSON: {exc}") from None
    kind = config.get("model_type")
    if kind != "vit":
        raise UsageError(
            f"{path} holds a Hugging Face {kind!r} model; dinocli reads ViTModel folders (model_type 'vit')"
        )
    for field, want in (("hidden_act", "gelu"), ("layer_norm_eps", 1e-6), ("qkv_bias", True)):
        if config.get(field, want) != want:
            raise UsageError(
                f"{path}: this ViT has {field}={config[field]!r}; DINO's ViT needs {want!r}, so its outputs would differ"
            )
    tensors, _ = _read_safetensors(path / WEIGHTS)
    state = from_hf_state_dict(tensors)
    metadata: dict[str, str] = {}
    if (path / METADATA).is_file():
        metadata = {str(k): str(v) for k, v in json.loads((path / METADATA).read_text()).items()}
    spec = json.loads(metadata[BACKBONE_SPEC_KEY]) if BACKBONE_SPEC_KEY in metadata else None
    if spec is None:
        from dinocli.weights import infer_backbone_spec

        spec = infer_backbone_spec(state)
        heads = _heads_of(spec["name"])
        if heads != config.get("num_attention_heads", heads):
            raise UsageError(
                f"{path}: {config['num_attention_heads']} attention heads, but dinocli's {spec['name']} has "
                f"{heads}; pass --arch"
            )
    return state, metadata, spec


def _heads_of(arch: str) -> int | None:
    from dinocli.backbones.vit import VIT_ARCHS

    return VIT_ARCHS[arch][2] if arch in VIT_ARCHS else None


def _preprocessor(metadata: dict[str, str]) -> dict[str, Any]:
    crop = int(metadata.get("crop_size") or 224)
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": crop, "width": crop},
        "resample": 3,  # bicubic, as dinocli's extract
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": json.loads(metadata["mean"]),
        "image_std": json.loads(metadata["std"]),
    }


def model_card(metadata: dict[str, str], pool: str) -> str:
    """The folder's README.md: what the model is and how to load it with transformers and with dinocli."""
    take = "last_hidden_state[:, 1:].mean(dim=1)" if pool == "avg" else "last_hidden_state[:, 0]"
    config = json.loads(metadata.get("config") or "{}")
    epochs = metadata.get("epoch") or "?"
    trained = ", ".join(
        f"{key} {config[key]}" for key in ("epochs", "batch_size", "lr", "out_dim", "global_crop_size") if key in config
    )
    return f"""---
library_name: transformers
tags: [dino, self-supervised, vision-transformer, dinocli]
---
# {metadata['arch']}/{metadata['patch_size']} trained with DINO (dinocli)

A DINO ({metadata['weights'] or 'backbone'} weights, epoch {epochs}) vision transformer exported by
`dino export --format huggingface` (dinocli {metadata['dinocli_version']}) from `{metadata['source_file']}`
(sha256 {metadata['source_sha256'][:16]}...). Embedding: {metadata['embed_dim']} wide, the
{'mean patch token' if pool == 'avg' else 'CLS token'} after the final LayerNorm.{' Training: ' + trained + '.' if trained else ''}

## transformers

```python
from transformers import ViTImageProcessor, ViTModel
processor = ViTImageProcessor.from_pretrained("PATH")
model = ViTModel.from_pretrained("PATH", add_pooling_layer=False).eval()
outputs = model(**processor(images, return_tensors="pt"))
embedding = outputs.{take}
```

At another image size pass `interpolate_pos_encoding=True` (transformers resizes the position
embeddings to the exact grid; the reference's bicubic scale factor differs slightly).

## dinocli

```python
import dinocli
model = dinocli.load_backbone("PATH")   # the same model, rebuilt from dinocli.json
```

Inputs are RGB images scaled to [0, 1] and normalised with mean {metadata['mean']} and std {metadata['std']}.
"""
