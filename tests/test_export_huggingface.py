"""``dino export --format huggingface``: a folder transformers loads with our outputs, and the way back."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dinocli
from dinocli.cli import app
from dinocli.errors import UsageError
from dinocli.export import export_backbone
from dinocli.weights import BACKBONE_SPEC_KEY

transformers = pytest.importorskip("transformers", reason="pip install 'dinocli[huggingface]'")


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return dinocli.create_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, **kwargs).eval()


def weights_file(tmp_path: Path, model: torch.nn.Module, **kwargs) -> Path:
    """A safetensors backbone that names its spec (the tensors alone cannot say ``pool``)."""
    path = tmp_path / "backbone.safetensors"
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": 8, "img_size": 32, "depth": 2, **kwargs}}
    save_file(model.state_dict(), str(path), metadata={BACKBONE_SPEC_KEY: json.dumps(spec)})
    return path


def hf_model(folder: Path):
    return transformers.ViTModel.from_pretrained(str(folder), add_pooling_layer=False).eval()


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_transformers_loads_the_folder_with_our_outputs(tmp_path, pool):
    model = tiny_vit(pool=pool)
    report = export_backbone(weights_file(tmp_path, model, pool=pool), tmp_path / "hf", format="huggingface")
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", "README.md", "dinocli.json"]
    )
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = hf_model(folder)(pixel_values=x).last_hidden_state
        want = model(x)
    got = tokens[:, 1:].mean(dim=1) if pool == "avg" else tokens[:, 0]
    assert (got - want).abs().max().item() <= 1e-5
    assert report.max_abs_diff <= 1e-5 and report.format == "huggingface"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and config["layer_norm_eps"] == 1e-6
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (192, 2, 3)
    card = (folder / "README.md").read_text()
    assert ("last_hidden_state[:, 1:].mean(dim=1)" if pool == "avg" else "last_hidden_state[:, 0]") in card
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_the_image_processor_normalises_like_dinocli(tmp_path):
    export_backbone(weights_file(tmp_path, tiny_vit()), tmp_path / "hf", format="huggingface")
    processor = transformers.ViTImageProcessor.from_pretrained(str(tmp_path / "hf"))
    image = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert processor.image_std == pytest.approx([0.229, 0.224, 0.225])


def test_load_backbone_reads_our_folder_back_exactly(tmp_path):
    model = tiny_vit(pool="avg")
    export_backbone(weights_file(tmp_path, model, pool="avg"), tmp_path / "hf", format="huggingface")
    again = dinocli.load_backbone(tmp_path / "hf")
    assert again.pool == "avg" and len(again.blocks) == 2
    x = torch.randn(2, 3, 40, 48)  # another size: our own interpolation, so exactly equal
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))


def test_load_backbone_reads_a_folder_written_by_transformers(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
        image_size=32, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True,
    )
    torch.manual_seed(0)
    theirs = transformers.ViTModel(config, add_pooling_layer=True).eval()  # a pooler dinocli drops
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = dinocli.load_backbone(tmp_path / "theirs")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        diff = (ours(x) - theirs(pixel_values=x).last_hidden_state[:, 0]).abs().max().item()
    assert diff <= 1e-5


def test_cli_export_and_every_weights_option_take_the_folder(cli, tmp_path):
    source = weights_file(tmp_path, tiny_vit())
    out = tmp_path / "vit-hf"
    result = cli.invoke(app, ["export", "-w", str(source), "-o", str(out), "--format", "huggingface"])
    assert result.exit_code == 0, result.output
    assert "huggingface" in result.output and "check: largest |difference|" in result.output
    assert "Loading weights" not in result.stderr  # transformers' progress bar stays out of the output
    again = cli.invoke(app, ["export", "-w", str(out), "-o", str(tmp_path / "back.safetensors")])
    assert again.exit_code == 0, again.output
    refused = cli.invoke(app, ["export", "-w", str(source), "-o", str(out), "--format", "huggingface"])
    assert refused.exit_code == 2 and "already exists" in refused.stderr
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    forced = cli.invoke(app, ["export", "-w", str(source), "-o", str(out), "--format", "huggingface", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "backbone.safetensors", "vit-hf"]


def test_what_vitmodel_cannot_express_is_a_one_line_error(cli, tmp_path):
    torch.manual_seed(0)
    resnet = tmp_path / "resnet.pth"
    torch.save(dinocli.create_backbone("resnet18").state_dict(), resnet)
    conv = tmp_path / "conv.pth"
    torch.save(dinocli.create_backbone("vit_tiny", patch_size=8, img_size=32, depth=1,
                                       patch_embed="conv").state_dict(), conv)
    for source, message in ((resnet, "needs a ViT backbone"), (conv, "convolutional patch stem")):
        result = cli.invoke(app, ["export", "-w", str(source), "-o", str(tmp_path / "x"), "--format", "huggingface"])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_folders_dinocli_cannot_read_are_refused(tmp_path):
    folder = tmp_path / "dinov2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(UsageError, match="'dinov2' model"):
        dinocli.load_backbone(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_act": "relu"}))
    with pytest.raises(UsageError, match="hidden_act='relu'"):
        dinocli.load_backbone(folder)
    with pytest.raises(UsageError, match="is a folder, not a weights file"):
        dinocli.load_backbone(tmp_path)


def test_without_transformers_the_export_says_how_to_install(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
    source = weights_file(tmp_path, tiny_vit())
    result = cli.invoke(app, ["export", "-w", str(source), "-o", str(tmp_path / "hf"), "--format", "huggingface"])
    assert result.exit_code == 2
    assert "pip install 'dinocli[huggingface]'" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    from dinocli.io import atomic_folder

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("the check failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_extract_reads_a_hugging_face_folder_as_weights(tmp_path, cli):
    from PIL import Image

    from dinocli.evaluate.features_io import load_features

    export_backbone(weights_file(tmp_path, tiny_vit()), tmp_path / "hf", format="huggingface")
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (40, 36), (40 * i, 90, 200)).save(data / f"{i}.png")
    result = cli.invoke(app, ["extract", "-w", str(tmp_path / "hf"), "-d", str(tmp_path / "data"), "-o",
                              str(tmp_path / "f.safetensors"), "--resize", "32", "--crop-size", "32",
                              "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    features = load_features(tmp_path / "f.safetensors")
    assert features.features.shape == (2, 192)
    weights = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert features.metadata["weights_sha256"] == weights

