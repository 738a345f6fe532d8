"""``dino export``: round trips per format, metadata, strict reference-layout loads, refusals."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import sys
import warnings
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import dinocli
from dinocli.cli import app
from dinocli.export import export_backbone

PATCH, CROP, DIM, DEPTH, HEADS = 8, 32, 192, 12, 3  # vit_tiny at 32 px


# -- an independent model in the reference layout ------------------------------------------


class RefAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, DIM))


class RefMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, eps=1e-6)
        self.attn = RefAttention()
        self.norm2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = RefMlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, PATCH)


class RefViT(nn.Module):
    """The reference ViT's key names and forward pass, written out with explicit attention."""

    def __init__(self) -> None:
        super().__init__()
        side = CROP // PATCH
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + 1, DIM))
        self.patch_embed = RefPatchEmbed()
        self.blocks = nn.ModuleList(RefBlock() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        n = self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == n and h == w:
            pos = self.pos_embed
        else:
            side = int(math.sqrt(n))
            grid = self.pos_embed[:, 1:].reshape(1, side, side, DIM).permute(0, 3, 1, 2)
            scale = ((h // PATCH + 0.1) / side, (w // PATCH + 0.1) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
            pos = torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, DIM)), 1)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def ref_model(state: dict[str, torch.Tensor]) -> RefViT:
    model = RefViT().eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def random_backbone_state(seed: int) -> dict[str, torch.Tensor]:
    """Reference-layout tensors with every value random (biases, norms and positions included)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in RefViT().state_dict().items():
        scale = 0.02 if value.ndim > 1 and "pos_embed" not in key else 0.5
        state[key] = torch.randn(value.shape, generator=generator) * scale
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            state[key] = state[key] + 1
    return state


def batch(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


SHAPES = [(2, 3, CROP, CROP), (5, 3, 48, 40), (1, 3, CROP, CROP + 3)]

# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    head_gen = torch.Generator().manual_seed(9)
    return {
        "teacher": random_backbone_state(1),
        "student": random_backbone_state(2),
        "teacher_head": {"last_layer.weight": torch.randn(10, DIM, generator=head_gen)},
        "student_head": {"last_layer.weight": torch.randn(10, DIM, generator=head_gen)},
    }


CONFIG = {"arch": "vit_tiny", "patch_size": PATCH, "out_dim": 10, "global_crop_size": CROP, "lr": 0.0005}


@pytest.fixture(scope="module")
def dinocli_checkpoint(tmp_path_factory, states) -> Path:
    """A checkpoint in the layout ``dino pretrain`` writes."""

    def entry(which: str) -> dict[str, torch.Tensor]:
        out = {f"backbone.{k}": v for k, v in states[which].items()}
        out.update({f"head.{k}": v for k, v in states[f"{which}_head"].items()})
        return out

    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save(
        {
            "student": entry("student"),
            "teacher": entry("teacher"),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 3,
            "iteration": 30,
            "config": CONFIG,
            "strategy": {"center": torch.zeros(1, 10)},
            "dinocli.backbone": {"name": "vit_tiny", "kwargs": {"patch_size": PATCH, "img_size": CROP}},
            "dinocli.version": "0.1.0",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def safetensors_export(tmp_path_factory, dinocli_checkpoint):
    out = tmp_path_factory.mktemp("st") / "vit_tiny.safetensors"
    return export_backbone(dinocli_checkpoint, out, include_head=True), out


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# -- safetensors ------------------------------------------------------------------------------


def test_safetensors_loads_strictly_into_the_reference_layout(safetensors_export, states):
    _, out = safetensors_export
    tensors, _ = read_safetensors(out)
    backbone = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    assert set(backbone) == set(RefViT().state_dict())
    model = ref_model(backbone)  # strict=True
    for key, value in states["teacher"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert {k: v for k, v in tensors.items() if k.startswith("head.")}.keys() == {"head.last_layer.weight"}
    assert torch.equal(tensors["head.last_layer.weight"], states["teacher_head"]["last_layer.weight"])


def test_load_backbone_rebuilds_the_export_from_metadata_alone(safetensors_export, states):
    report, out = safetensors_export
    loaded = dinocli.load_backbone(out)  # no arch, no patch size
    reference = ref_model(states["teacher"])
    assert loaded.patch_size == PATCH and loaded.embed_dim == DIM
    with torch.no_grad():
        for shape in SHAPES:
            assert max_diff(loaded(batch(*shape)), reference(batch(*shape))) < 1e-5, shape
    assert report.max_abs_diff == 0.0  # the check compares the reloaded file with the same model


def test_safetensors_metadata(safetensors_export, dinocli_checkpoint):
    report, out = safetensors_export
    _, meta = read_safetensors(out)
    assert meta == report.metadata
    assert json.loads(meta["dinocli.backbone"]) == {
        "name": "vit_tiny",
        "kwargs": {"patch_size": PATCH, "img_size": CROP},
    }
    expected = {
        "format": "safetensors",
        "arch": "vit_tiny",
        "backbone_plugin": "vit",
        "patch_size": str(PATCH),
        "embed_dim": str(DIM),
        "depth": str(DEPTH),
        "num_heads": str(HEADS),
        "crop_size": str(CROP),
        "weights": "teacher",
        "epoch": "3",
        "source_file": "checkpoint.pth",
        "source_sha256": hashlib.sha256(dinocli_checkpoint.read_bytes()).hexdigest(),
        "dinocli_version": dinocli.__version__,
        "dtype": "fp32",
        "include_head": "true",
    }
    assert {k: meta[k] for k in expected} == expected
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert json.loads(meta["config"]) == CONFIG
    plugins = {p["name"]: p for p in json.loads(meta["plugins"])}
    assert plugins["vit"] == {
        "name": "vit",
        "distribution": "dinocli",
        "version": importlib_metadata.version("dinocli"),
    }
    assert all(isinstance(v, str) for v in meta.values())


def test_export_from_a_reference_checkpoint(tmp_path, states):
    args = argparse.Namespace(arch="vit_tiny", patch_size=PATCH, out_dim=10, lr=0.0005)
    source = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": {f"module.backbone.{k}": v for k, v in states["student"].items()},
            "teacher": {f"backbone.{k}": v for k, v in states["teacher"].items()}
            | {"head.last_layer.weight_g": torch.ones(10, 1)},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 5,
            "args": args,
            "dino_loss": {"center": torch.zeros(1, 10)},
        },
        source,
    )
    out = tmp_path / "out.safetensors"
    report = export_backbone(source, out, checkpoint_key="student")
    tensors, meta = read_safetensors(out)
    model = ref_model(tensors)  # strict: no head, no prefixes
    for key, value in states["student"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report.arch == "vit_tiny" and report.checkpoint_key == "student"
    assert meta["weights"] == "student" and meta["epoch"] == "5" and meta["patch_size"] == str(PATCH)
    assert json.loads(meta["config"]) == vars(args)
    with torch.no_grad():
        x = batch(*SHAPES[1])
        assert max_diff(dinocli.load_backbone(out)(x), ref_model(states["student"])(x)) < 1e-5


def test_cli_exports_student_weights_in_fp16(cli, tmp_path, dinocli_checkpoint, states):
    out = tmp_path / "student.safetensors"
    result = cli.invoke(
        app,
        ["export", "-w", str(dinocli_checkpoint), "-o", str(out), "--checkpoint-key", "student", "--dtype", "fp16"],
    )
    assert result.exit_code == 0, result.output
    assert "check: largest |difference| from PyTorch" in result.output
    tensors, meta = read_safetensors(out)
    assert meta["weights"] == "student" and meta["dtype"] == "fp16" and meta["include_head"] == "false"
    assert not any(k.startswith("head.") for k in tensors)
    for key, value in states["student"].items():
        assert tensors[key].dtype == torch.float16
        assert torch.equal(tensors[key], value.half()), key
    # Loaded back (as float32) it is the student with its weights rounded to fp16 ...
    rounded = ref_model({k: v.half().float() for k, v in states["student"].items()})
    exact = ref_model(states["student"])
    with torch.no_grad():
        x = batch(*SHAPES[0])
        got = dinocli.load_backbone(out)(x)
        assert max_diff(got, rounded(x)) < 1e-5
        # ... which is the float32 student to fp16 precision.
        assert max_diff(got, exact(x)) < 2**-10 * 8 * exact(x).abs().max().item()


# -- TorchScript ------------------------------------------------------------------------------


def jit_load(path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu", **kwargs)


def test_torchscript_round_trip(tmp_path, dinocli_checkpoint, states):
    out = tmp_path / "vit_tiny.pt"
    report = export_backbone(dinocli_checkpoint, out, format="torchscript")
    assert report.dynamic_batch and report.dynamic_image_size and report.max_abs_diff < 1e-5
    extra = {"dinocli.json": ""}
    module = jit_load(out, _extra_files=extra)
    assert json.loads(extra["dinocli.json"]) == report.metadata
    assert report.metadata["format"] == "torchscript"
    reference = ref_model(states["teacher"])
    with torch.no_grad():
        for shape in SHAPES:
            x = batch(*shape)
            got = module(x)
            assert got.shape == (shape[0], DIM)
            assert max_diff(got, reference(x)) < 1e-5, shape
        # --weights readers take the TorchScript file too (tensors read without running its code).
        assert max_diff(dinocli.load_backbone(out)(x), reference(x)) < 1e-5


def test_conv_stem_vit_exports_and_stays_portable(tmp_path):
    """A ViT with a convolutional stem exports to TorchScript, and its traceable form (what ONNX
    export traces) equals it at every batch and image size, remainders included."""
    from dinocli.export.portable_vit import PortableViT

    torch.manual_seed(0)
    model = dinocli.create_backbone("vit_tiny", patch_size=4, img_size=32, patch_embed="conv")
    model.train()(batch(8, 3, 32, 32))  # BatchNorm statistics away from their start
    model.eval()
    source = tmp_path / "convstem.pth"
    torch.save(model.state_dict(), source)
    out = tmp_path / "convstem.pt"
    report = export_backbone(source, out, format="torchscript")
    assert report.max_abs_diff < 1e-5
    module = jit_load(out)
    portable = PortableViT(model).eval()
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (3, 3, 40, 36), (1, 3, 35, 33)]:
            x = batch(*shape)
            expected = model(x)
            assert max_diff(module(x), expected) < 1e-5, shape
            assert max_diff(portable(x), expected) < 1e-5, shape


@pytest.mark.slow
def test_torchscript_bf16(tmp_path, dinocli_checkpoint, states):
    out = tmp_path / "vit_tiny_bf16.pt"
    export_backbone(dinocli_checkpoint, out, format="torchscript", dtype="bf16")
    module = jit_load(out)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    same_dtype = dinocli.load_backbone(dinocli_checkpoint).to(torch.bfloat16)
    reference = ref_model(states["teacher"])
    with torch.no_grad():
        x = batch(*SHAPES[1])
        got = module(x.bfloat16())
        assert got.dtype == torch.bfloat16
        scale = reference(x).abs().max().item()
        assert max_diff(got, same_dtype(x.bfloat16())) <= 2**-8 * scale
        assert max_diff(got, reference(x)) < 0.1 * scale


def test_torchscript_reader_refuses_python_objects(tmp_path):
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # pickle that calls os.system
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/constants.pkl", pickle.dumps(()))
        archive.writestr("archive/code/__torch__/m.py", "")
    with pytest.raises(dinocli.DinoError, match="refusing to read .*'os.system'"):
        dinocli.load_backbone(path)
    assert not marker.exists()


# -- ONNX ----------------------------------------------------------------------------------


needs_onnx = pytest.mark.skipif(
    not has_onnx(), reason="onnx/onnxruntime not installed (pip install 'dinocli[onnx]')"
)


def check_onnx_round_trip(tmp_path: Path, checkpoint: Path, teacher: dict, dtype: str, tolerance: float):
    import onnx
    import onnxruntime

    reference = ref_model(teacher)
    out = tmp_path / f"vit_tiny_{dtype}.onnx"
    report = export_backbone(checkpoint, out, format="onnx", dtype=dtype)
    assert report.dynamic_batch and report.dynamic_image_size
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props == report.metadata and props["dtype"] == dtype and props["format"] == "onnx"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    numpy_type = {"fp32": "float32", "fp16": "float16"}[dtype]
    for shape in SHAPES:
        x = batch(*shape)
        (got,) = session.run(None, {"image": x.numpy().astype(numpy_type)})
        with torch.no_grad():
            want = reference(x)
        assert got.shape == (shape[0], DIM)
        limit = tolerance * max(1.0, want.abs().max().item())
        assert max_diff(torch.from_numpy(got), want) < limit, shape


@needs_onnx
def test_onnx_round_trip(tmp_path, dinocli_checkpoint, states):
    check_onnx_round_trip(tmp_path, dinocli_checkpoint, states["teacher"], "fp32", 1e-5)


@needs_onnx
@pytest.mark.slow
def test_onnx_round_trip_fp16(tmp_path, dinocli_checkpoint, states):
    check_onnx_round_trip(tmp_path, dinocli_checkpoint, states["teacher"], "fp16", 2**-10 * 16)


def test_onnx_without_onnxruntime_says_how_to_install(cli, tmp_path, dinocli_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if absent
    out = tmp_path / "m.onnx"
    result = cli.invoke(app, ["export", "-w", str(dinocli_checkpoint), "-o", str(out), "--format", "onnx"])
    assert result.exit_code == 2
    assert "pip install 'dinocli[onnx]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_output_suffix_names_the_format_unless_format_is_given(cli, tmp_path, dinocli_checkpoint, monkeypatch):
    report = export_backbone(dinocli_checkpoint, tmp_path / "m.pt")
    assert report.format == "torchscript" and jit_load(tmp_path / "m.pt") is not None
    assert export_backbone(dinocli_checkpoint, tmp_path / "m.bin").format == "safetensors"  # no suffix of a format
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = cli.invoke(app, ["export", "-w", str(dinocli_checkpoint), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "pip install 'dinocli[onnx]'" in result.stderr  # the suffix asked for ONNX
    result = cli.invoke(app, ["export", "-w", str(dinocli_checkpoint), "-o", str(tmp_path / "x.safetensors"), "-f",
                              "torchscript"])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == (f"error: --output {tmp_path / 'x.safetensors'} names a safetensors file but --format is "
                             "torchscript; change the name or the format\n")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.pt"]


# -- refusals -------------------------------------------------------------------------------


def test_existing_output_is_refused_unless_force(cli, tmp_path, dinocli_checkpoint):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    args = ["export", "-w", str(dinocli_checkpoint), "-o", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"keep me"
    result = cli.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert read_safetensors(out)[1]["arch"] == "vit_tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "onx"], "unknown export format 'onx'. Did you mean 'onnx'?"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--checkpoint-key", "teachr"], "Did you mean 'teacher'?"),
        (["--format", "torchscript", "--include-head"], "--include-head applies to safetensors exports only"),
    ],
)
def test_bad_options_are_one_line_usage_errors(cli, tmp_path, dinocli_checkpoint, extra, message):
    out = tmp_path / "out.bin"
    result = cli.invoke(app, ["export", "-w", str(dinocli_checkpoint), "-o", str(out), *extra])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_weights_and_backbone_only_head(cli, tmp_path, states):
    result = cli.invoke(app, ["export", "-w", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "weights file not found" in result.stderr
    plain = tmp_path / "backbone.pth"
    torch.save(states["teacher"], plain)
    result = cli.invoke(app, ["export", "-w", str(plain), "-o", str(tmp_path / "o"), "--include-head"])
    assert result.exit_code == 2 and "has no head weights" in result.stderr


def test_a_failed_check_writes_nothing(tmp_path, dinocli_checkpoint, monkeypatch):
    import dinocli.export as export

    monkeypatch.setitem(export.TOLERANCE, "fp32", -1.0)  # even a perfect export now fails the check
    out = tmp_path / "model.safetensors"
    with pytest.raises(dinocli.DinoError, match="differs from PyTorch by 0 .*nothing was written") as info:
        export_backbone(dinocli_checkpoint, out)
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_mean_patch_token_vit_keeps_its_pooling_in_every_format(tmp_path):
    """A ViT whose output is the mean patch token (``pool="avg"``) exports to safetensors (the
    pooling in its metadata) and TorchScript, and its traceable form pools the same way."""
    from dinocli.export.portable_vit import PortableViT

    torch.manual_seed(0)
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "img_size": 32, "pool": "avg"}}
    model = dinocli.create_backbone(spec["name"], **spec["kwargs"]).eval()
    source = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "dinocli.backbone": spec}, source)
    x = batch(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert max_diff(expected, model.forward_features(x)[:, 0]) > 1e-2  # not the CLS token
        export_backbone(source, tmp_path / "avg.safetensors")
        loaded = dinocli.load_backbone(tmp_path / "avg.safetensors")
        assert loaded.pool == "avg" and max_diff(loaded(x), expected) == 0
        export_backbone(source, tmp_path / "avg.pt", format="torchscript")
        assert max_diff(jit_load(tmp_path / "avg.pt")(x), expected) < 1e-5
        for shape in [(2, 3, 32, 32), (1, 3, 40, 36)]:
            y = batch(*shape)
            assert max_diff(PortableViT(model).eval()(y), model(y)) < 1e-5, shape
