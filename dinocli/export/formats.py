"""Writing a backbone in each export format, and running what was written (for the check).

Every writer takes the backbone (already in the export dtype), writes ``path`` and returns a
function that runs the written file on a float32 image batch and returns float32 embeddings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dinocli.errors import DinoError, UsageError

Runner = Callable[[torch.Tensor], torch.Tensor]

#: Name of the metadata file inside a TorchScript archive (``torch.jit.load(..., _extra_files=)``).
TORCHSCRIPT_METADATA = "dinocli.json"
ONNX_INPUT, ONNX_OUTPUT = "image", "embedding"
ONNX_OPSET = 17
ONNX_INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'dinocli[onnx]'"


def write_safetensors(
    path: Path,
    model: nn.Module,
    head: dict[str, torch.Tensor],
    metadata: dict[str, str],
    dtype: torch.dtype,
) -> Runner:
    """The backbone's state dict in the reference layout (plus ``head.*``), with ``metadata``."""
    tensors = {key: _cast(t, dtype) for key, t in model.state_dict().items()}
    tensors.update({f"head.{key}": _cast(t, dtype) for key, t in head.items()})
    save_file(tensors, str(path), metadata=metadata)

    from dinocli.weights import load_backbone

    loaded = load_backbone(path)  # float32, rebuilt from the metadata alone

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(x).float()

    return run


def write_torchscript(
    path: Path, model: nn.Module, metadata: dict[str, str], dtype: torch.dtype
) -> Runner:
    """``torch.jit.script`` of the backbone; ``torch.jit.trace`` where the backbone cannot be scripted."""
    model = model.to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - plugin backbones may use Python TorchScript cannot compile
            side = int(metadata.get("crop_size") or 224)
            example = torch.zeros(2, 3, side, side, dtype=dtype)
            with torch.no_grad():
                module = torch.jit.trace(model, example, check_trace=False)
        with open(path, "wb") as f:  # a file object: the archive's root folder is 'archive'
            torch.jit.save(module, f, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(x.to(dtype)).float()

    return run


def write_onnx(path: Path, model: nn.Module, metadata: dict[str, str], dtype: torch.dtype) -> Runner:
    """An ONNX graph ``image [B, 3, H, W] -> embedding [B, D]`` with dynamic batch, height, width."""
    onnx, ort = require_onnx()
    if dtype == torch.bfloat16:
        raise UsageError("ONNX export supports --dtype fp32 and fp16 (onnxruntime has no bf16 CPU kernels)")
    from dinocli.backbones.vit import VisionTransformer
    from dinocli.export.portable_vit import PortableViT

    model = model.to(dtype).eval()
    graph = PortableViT(model).eval() if isinstance(model, VisionTransformer) else model
    side = int(metadata.get("crop_size") or 224)
    example = torch.zeros(2, 3, side, side, dtype=dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch", 2: "height", 3: "width"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            (out,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy().astype(numpy_dtype)})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DinoError(f"onnxruntime failed on {list(x.shape)}: {str(exc).splitlines()[0]}") from None
        return torch.from_numpy(out).float()

    return run


def require_onnx() -> tuple[object, object]:
    """The ``onnx`` and ``onnxruntime`` modules, or a :class:`UsageError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UsageError(ONNX_INSTALL_HINT) from None
    return onnx, onnxruntime


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
