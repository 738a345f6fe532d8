"""Tests of the timm plugin with real timm models and random weights (nothing is downloaded).

Run from the dinocli repository root (``pytest plugins/dino-timm/tests``); the plugin must be
installed (``pip install -e plugins/dino-timm``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("dino_timm", reason="the timm plugin is not installed: pip install -e plugins/dino-timm")

import timm  # noqa: E402
import typer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import dinocli  # noqa: E402
from dinocli.cli import app  # noqa: E402
from dinocli.errors import DinoError, UsageError  # noqa: E402
from dinocli.registry import PluginInfo, Registry, get_registry, reset_registry  # noqa: E402
from dino_timm.backbone import TimmBackbone, attention_probs  # noqa: E402

TINY_VIT = "timm/vit_tiny_patch16_224"
REAL_IMAGES = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "imagenette224_sub"


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv("DINOCLI_PLUGINS", raising=False)
    reset_registry()
    yield get_registry()
    reset_registry()


def batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- patterns in the registry (a toy plugin: no timm) ---------------------------------------------


class ToyNet(torch.nn.Module):
    patch_size = None
    supports_attention = False

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed_dim = width
        self.fc = torch.nn.Linear(3, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ToyPlugin:
    """Registers ``toy/*`` (widths ``toy/8``, ``toy/16``) and the plain name ``toy/exact``."""

    def __init__(self, names=("8", "16")) -> None:
        self.listed = 0
        self.names = names

    def list_names(self):
        self.listed += 1
        if isinstance(self.names, Exception):
            raise self.names
        return self.names

    @dinocli.hookimpl
    def dinocli_register_backbones(self, register):
        register("toy/*", lambda width, **kw: ToyNet(int(width)), description="toys", names=self.list_names)
        register("toy/exact", lambda **kw: ToyNet(3))


def toy_registry(plugin: ToyPlugin) -> Registry:
    reg = Registry()
    reg.add_plugin(plugin, PluginInfo(name="toy", distribution="toy-dist", version="1", builtin=False))
    return reg


def test_a_pattern_is_resolved_lazily_on_lookup():
    plugin = ToyPlugin()
    reg = toy_registry(plugin)
    assert reg.plugins["toy"].provides["backbones"] == ["toy/*", "toy/exact"]
    assert reg.names("backbones") == ["toy/exact"] and plugin.listed == 0  # listing imports nothing
    assert reg.create("backbones", "toy/exact").embed_dim == 3 and plugin.listed == 0  # plain wins
    assert reg.create("backbones", "toy/16", img_size=32).embed_dim == 16
    assert reg.get("backbones", "toy/8").plugin == "toy"
    assert reg.names("backbones", expand=True) == ["toy/16", "toy/8", "toy/exact"]
    assert reg.completions("backbones", "to") == ["toy/", "toy/exact"]
    assert reg.completions("backbones", "toy/1") == ["toy/16"]
    assert plugin.listed == 1  # computed once
    with pytest.raises(UsageError, match=r"unknown backbone 'toy/17'\. Did you mean 'toy/16'\? Available: toy/\*, toy/exact\."):
        reg.get("backbones", "toy/17")


def test_a_failing_name_list_is_one_clear_error():
    reg = toy_registry(ToyPlugin(names=OSError("no such library")))
    assert reg.create("backbones", "toy/exact").embed_dim == 3  # the rest keeps working
    with pytest.raises(DinoError, match=r"^plugin 'toy' cannot list the names of 'toy/\*': OSError: no such library$"):
        reg.get("backbones", "toy/8")


@pytest.mark.parametrize("name, names", [("toy/*", None), ("toy", lambda: ["a"]), ("t*y/*", lambda: ["a"]), ("*", list)])
def test_malformed_patterns_disable_the_plugin(name, names, capsys):
    class Bad:
        @dinocli.hookimpl
        def dinocli_register_backbones(self, register):
            register(name, ToyNet, names=names)

    reg = Registry()
    reg.add_plugin(Bad(), PluginInfo(name="bad", distribution="bad", version="1", builtin=False))
    assert "a pattern is a prefix followed by one '*'" in reg.plugins["bad"].error
    assert reg.families("backbones") == [] and reg.names("backbones") == []
    assert "plugin 'bad' disabled" in capsys.readouterr().err


# -- the timm pattern -----------------------------------------------------------------------------


def test_listing_the_pattern_does_not_import_timm():
    code = (
        "import json, sys\n"
        "from dinocli.cli import main\n"
        "try:\n"
        "    main(['plugins', '--json'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps({'timm_imported': 'timm' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listing, tail = out.stdout.rsplit("\n{", 1)
    assert json.loads("{" + tail) == {"timm_imported": False}
    (row,) = [p for p in json.loads(listing)["plugins"] if p["name"] == "timm"]
    assert row["distribution"] == "dinocli-timm" and row["error"] is None
    assert row["backbones"] == ["timm/*"]


def test_names_are_timms_and_unknown_names_get_the_closest(registry):
    (family,) = [f for f in registry.families("backbones") if f.plugin == "timm"]
    assert family.pattern == "timm/*"
    assert family.names() == sorted("timm/" + n for n in timm.list_models())
    assert registry.get("backbones", TINY_VIT).plugin == "timm"
    assert TINY_VIT in registry.names("backbones", expand=True)
    assert TINY_VIT not in registry.names("backbones")  # patterns stay unexpanded by default
    with pytest.raises(UsageError) as err:
        registry.get("backbones", "timm/vit_tiny_patch16_22")
    message = str(err.value)
    assert "Did you mean 'timm/vit_tiny_patch16_224'?" in message and "timm/*" in message
    assert "\n" not in message and len(message) < 400  # the pattern is listed, not its 1000+ names


def test_plugins_expand_counts_and_lists_the_names(registry):
    result = CliRunner().invoke(app, ["plugins", "--expand", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [p for p in json.loads(result.output)["plugins"] if p["name"] == "timm"]
    assert row["pattern_names"]["timm/*"] == sorted("timm/" + n for n in timm.list_models())
    table = CliRunner().invoke(app, ["plugins", "--expand"], env={"COLUMNS": "250"})
    assert f"timm/* ({len(timm.list_models())} names)" in table.output


@pytest.mark.parametrize("command", ["pretrain", "knn", "extract", "export", "attn-maps"])
def test_arch_completes_timm_names(registry, command):
    click_command = typer.main.get_command(app).commands[command]
    (arch,) = [p for p in click_command.params if p.name == "arch"]
    ctx = click_command.make_context(command, [], resilient_parsing=True)

    def complete(incomplete: str) -> list[str]:
        return [item.value for item in arch.shell_complete(ctx, incomplete)]

    assert complete("timm/convnext_at") == sorted(
        "timm/" + n for n in timm.list_models("convnext_at*")
    )
    assert "timm/" in complete("ti") and "vit_small" in complete("vi")


# -- the backbones --------------------------------------------------------------------------------


def test_vit_takes_dinocli_arguments_and_any_crop_size(registry):
    model = dinocli.create_backbone(
        TINY_VIT, img_size=64, depth=2, drop_path_rate=0.2, patch_size=8, pool="avg", patch_embed="conv"
    )
    assert isinstance(model, dinocli.Backbone) and isinstance(model, TimmBackbone)
    vit = model.model
    assert (model.embed_dim, model.patch_size, model.supports_attention, model.num_heads) == (192, 16, True, 3)
    assert len(vit.blocks) == 2 and vit.pos_embed.shape == (1, 1 + 4 * 4, 192)  # 64-px crops
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # the last block gets the full rate
    assert not any(p.requires_grad is False for p in model.parameters())
    assert set(model.state_dict()) == {"model." + k for k in vit.state_dict()}
    model.eval()
    for size in (64, 32, 96):  # global and local crops: the position embeddings are resampled
        assert model(batch(size)).shape == (2, 192)
    odd = batch(40)  # not whole patches: cropped to 32 px as a patch convolution would
    torch.testing.assert_close(model(odd), model(odd[..., :32, :32]))
    model.train()
    model(batch(32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("convnext_atto", 320)])
def test_cnn_backbones(registry, name, dim):
    model = dinocli.create_backbone(f"timm/{name}", img_size=32, depth=3, patch_size=16, drop_path_rate=0.1)
    assert (model.embed_dim, model.patch_size, model.supports_attention) == (dim, None, False)
    assert model(batch(32)).shape == (2, dim) and model(batch(48)).shape == (2, dim)
    from dinocli.visualize.attention import require_attention

    with pytest.raises(UsageError, match="has no self-attention"):
        require_attention(model, f"timm/{name}")


def test_last_selfattention_matches_the_formula(registry):
    model = dinocli.create_backbone(TINY_VIT, img_size=32, depth=2).eval()
    last = model.model.blocks[-1]
    seen = {}
    last.norm1.register_forward_hook(lambda m, args, out: seen.setdefault("tokens", out))
    x = batch(32, n=3)
    with torch.no_grad():
        model(x)
        got = model.get_last_selfattention(x)
    tokens = seen["tokens"]  # the last block's normed input, from the ordinary forward pass
    heads, head_dim = 3, 64
    qkv = tokens @ last.attn.qkv.weight.T + last.attn.qkv.bias
    q, k = (qkv[..., i * 192:(i + 1) * 192].reshape(3, 5, heads, head_dim).transpose(1, 2) for i in (0, 1))
    want = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
    assert got.shape == (3, heads, 1 + 4, 1 + 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, heads, 5))


def test_same_weights_as_dinocli_vit_give_the_same_features_and_attention(registry):
    """timm's ViT and dinocli's reference-layout ViT share their key names: with the same weights
    they compute the same CLS embedding and last-block attention (at the training size)."""
    ours = dinocli.create_backbone("vit_tiny", patch_size=16, img_size=64, depth=2).eval()
    theirs = dinocli.create_backbone(TINY_VIT, img_size=64, depth=2).eval()
    theirs.model.load_state_dict(ours.state_dict(), strict=True)
    x = batch(64, n=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            theirs.get_last_selfattention(x), ours.get_last_selfattention(x), rtol=1e-5, atol=1e-6
        )


def test_last_selfattention_leaves_out_registers_and_uses_qk_norm():
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2,
        reg_tokens=4, qk_norm=True, dynamic_img_size=True,
    )
    model = TimmBackbone(vit).eval()
    attn = vit.blocks[-1].attn
    with torch.no_grad():  # non-trivial q/k norms, so that leaving them out would show
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    attn.fused_attn = False  # timm's own explicit softmax, captured at its attention dropout
    seen = {}
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.setdefault("probs", args[0]))
    x = batch(48, n=2)
    with torch.no_grad():
        model(x)
        got = model.get_last_selfattention(x)
    full = seen["probs"]  # [B, heads, 1 + 4 + 9, 1 + 4 + 9]: CLS, 4 registers, 3x3 patches
    keep = torch.tensor([0, *range(5, 14)])
    assert got.shape == (2, 3, 10, 10)
    torch.testing.assert_close(got, full[:, :, keep][:, :, :, keep], rtol=1e-5, atol=1e-6)
    assert attention_probs(attn, torch.randn(1, 7, 192)).shape == (1, 3, 7, 7)


def test_other_vits_have_no_attention_to_give(registry):
    eva = dinocli.create_backbone("timm/eva02_tiny_patch14_224", img_size=28, depth=1)  # rotary attention
    assert eva.supports_attention is False and eva.patch_size == 14
    with pytest.raises(TypeError, match="no plain self-attention"):
        eva.get_last_selfattention(batch(28))


# -- pretrain -> extract/knn/attn-maps/export on real images --------------------------------------


def _image_subset(root: Path, dest: Path, per_class: int) -> Path:
    """A few images of the first two classes of ``root`` (symbolic links), in ImageFolder layout."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:2]:
        (dest / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (dest / folder.name / image.name).symlink_to(image)
    return dest


@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason=f"real images not found: {REAL_IMAGES}")
def test_pretrain_then_every_command_on_real_images(registry, tmp_path):
    from dinocli.train import pretrain, resolve_config

    train = _image_subset(REAL_IMAGES / "train", tmp_path / "train", per_class=4)
    val = _image_subset(REAL_IMAGES / "val", tmp_path / "val", per_class=2)
    run = tmp_path / "run"
    cfg = resolve_config(overrides=dict(
        data=str(train), output=str(run), arch=TINY_VIT, depth=2, global_crop_size=64,
        local_crop_size=32, local_crops_number=2, out_dim=64, batch_size=4, epochs=1,
        warmup_epochs=0, num_workers=0, precision="fp32", progress=False,
    ))
    result = pretrain(cfg)
    assert (result.epochs, result.iterations) == (1, 2)
    checkpoint = run / "checkpoint.pth"
    teacher = torch.load(checkpoint, weights_only=True)["teacher"]
    first = teacher["backbone.model.blocks.0.attn.qkv.weight"]
    assert torch.isfinite(first).all()

    cli = CliRunner()
    # The checkpoint rebuilds the timm model by name: every command reads it without --arch.
    model = dinocli.load_backbone(checkpoint)
    assert isinstance(model, TimmBackbone) and len(model.model.blocks) == 2
    torch.testing.assert_close(model.state_dict()["model.blocks.0.attn.qkv.weight"], first)

    feats = tmp_path / "val.safetensors"
    out = cli.invoke(app, ["extract", "-w", str(checkpoint), "-d", str(val), "-o", str(feats), "--num-workers", "0"])
    assert out.exit_code == 0, out.output
    stored = load_file(str(feats))
    assert any(t.shape == (4, 192) for t in stored.values())

    out = cli.invoke(app, ["knn", "-w", str(checkpoint), "--train-data", str(train), "--val-data", str(val),
                           "--num-workers", "0"])
    assert out.exit_code == 0, out.output
    assert "top-1" in out.output

    image = sorted((val / sorted(p.name for p in val.iterdir())[0]).iterdir())[0]
    out = cli.invoke(app, ["attn-maps", "-w", str(checkpoint), str(image), "-o", str(tmp_path / "attn")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "attn" / "index.html").is_file()
    assert len(list((tmp_path / "attn").rglob("*.png"))) >= 3  # one map per head at least

    x = batch(64, n=2, seed=3)
    with torch.no_grad():
        want = model(x)
    for fmt in ("safetensors", "torchscript"):
        path = tmp_path / f"vit.{fmt}"
        out = cli.invoke(app, ["export", "-w", str(checkpoint), "-o", str(path), "--format", fmt])
        assert out.exit_code == 0, out.output
        assert "1x3x80x96" in out.output  # checked at another image size too
    rebuilt = dinocli.load_backbone(tmp_path / "vit.safetensors")  # from the file's metadata alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        scripted = torch.jit.load(str(tmp_path / "vit.torchscript"))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), want)
        torch.testing.assert_close(scripted(x), want)
        torch.testing.assert_close(scripted(batch(96, n=1)), model(batch(96, n=1)))  # another size
    # An export's keys are timm's under "model.": strip it and timm itself loads the weights.
    exported = {k.removeprefix("model."): v for k, v in load_file(str(tmp_path / "vit.safetensors")).items()}
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=64)
    plain.load_state_dict(exported, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), want)


def test_cnn_exports_to_torchscript_and_back(registry, tmp_path):
    from safetensors.torch import save_file

    from dinocli.export import export_backbone
    from dinocli.weights import BACKBONE_SPEC_KEY

    model = dinocli.create_backbone("timm/resnet18", img_size=32).eval()
    source = tmp_path / "resnet.safetensors"
    spec = {"name": "timm/resnet18", "kwargs": {"img_size": 32}}
    save_file(model.state_dict(), str(source), metadata={BACKBONE_SPEC_KEY: json.dumps(spec)})
    report = export_backbone(source, tmp_path / "resnet.pt", format="torchscript")
    assert report.arch == "timm/resnet18" and report.max_abs_diff < 1e-5
    assert report.metadata["backbone_plugin"] == "timm" and report.metadata["patch_size"] == ""
    x = batch(32)
    with torch.no_grad():
        torch.testing.assert_close(dinocli.load_backbone(tmp_path / "resnet.pt")(x), model(x))
