"""`dino attn-maps` and dinocli.visualize: attention numerics, masks, pictures and the command."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import dinocli
from dinocli.cli import app
from dinocli.visualize import (
    attention_mask,
    attention_maps,
    lookup_table,
    preprocess,
    upsample,
)
from dinocli.visualize.colormaps import anchor_colors, apply_colormap
from dinocli.visualize.render import mask_outline, overlay_mask

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "photos"
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def tiny_vit(patch_size: int = 8, seed: int = 0, pool: str = "cls") -> torch.nn.Module:
    """vit_tiny with a sharpened last block, so that its attention is far from uniform."""
    torch.manual_seed(seed)
    model = dinocli.create_backbone("vit_tiny", patch_size=patch_size, img_size=32, pool=pool).eval()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(10.0)
    return model


def save_safetensors(model: torch.nn.Module, path: Path, patch_size: int) -> Path:
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": patch_size, "img_size": 32}}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"dinocli.backbone": json.dumps(spec)})
    return path


def blob_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A dark noisy background with one bright disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.2 * min(width, height)) ** 2
    pixels = rng.normal(40, 15, size=(height, width, 3))
    pixels[disc] = [230, 180, 60]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def independent_last_attention(model, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block from its LayerNorm and qkv weights, in float64."""
    tokens = model.prepare_tokens(x)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    last = model.blocks[-1]
    t = tokens.double()
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    normed = (t - mu) / torch.sqrt(var + last.norm1.eps)
    normed = normed * last.norm1.weight.double() + last.norm1.bias.double()
    W, b = last.attn.qkv.weight.double(), last.attn.qkv.bias.double()
    dim, heads = W.shape[1], last.attn.num_heads
    d = dim // heads
    q = normed @ W[:dim].T + b[:dim]
    k = normed @ W[dim : 2 * dim].T + b[dim : 2 * dim]
    out = []
    for h in range(heads):
        qh, kh = q[..., h * d : (h + 1) * d], k[..., h * d : (h + 1) * d]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        e = torch.exp(scores - scores.max(-1, keepdim=True).values)
        out.append(e / e.sum(-1, keepdim=True))
    return torch.stack(out, dim=1)  # [B, heads, 1+N, 1+N]


# -- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size,height,width", [(8, 32, 48), (16, 64, 32)])
def test_raw_maps_equal_softmax_attention_of_last_block(patch_size, height, width):
    model = tiny_vit(patch_size)
    images = [torch.randn(3, height, width, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    maps = attention_maps(model, images)
    h, w = height // patch_size, width // patch_size
    with torch.no_grad():
        expected = independent_last_attention(model, torch.stack(images))
    assert expected[0, 0, 0].max() > 3.0 / (1 + h * w)  # the sharpened block is not uniform
    for i, m in enumerate(maps):
        assert m.dtype == torch.float32 and tuple(m.shape) == (3, h, w)
        for head in range(3):
            for r in range(h):
                for c in range(w):
                    want = expected[i, head, 0, 1 + r * w + c].item()
                    assert m[head, r, c].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_mean_patch_token_vit_shows_the_patch_queries_averaged(tmp_path):
    """For a ViT whose output is the mean patch token, a map is the attention of the patch queries
    averaged: per key patch, the mean of its column over the patch rows."""
    model = tiny_vit(8, pool="avg")
    image = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(3))
    (m,) = attention_maps(model, [image])
    with torch.no_grad():
        expected = independent_last_attention(model, image[None])[0]  # [heads, 1+N, 1+N]
    want = expected[:, 1:, 1:].mean(dim=1).reshape(3, 4, 6).float()
    torch.testing.assert_close(m, want, rtol=1e-4, atol=1e-6)
    assert (m - expected[:, 0, 1:].reshape(3, 4, 6).float()).abs().max() > 1e-3  # not the CLS row

    from dinocli.visualize import write_attention_pages

    photo = blob_image(48, 32, 1)
    report = write_attention_pages(model, [("blob", photo)], tmp_path / "out", image_size=(32, 48))
    (shown,) = attention_maps(model, [preprocess(photo, (32, 48), 8)[0]])
    with safe_open(str(report.images[0].files["attention"]), framework="pt") as f:
        assert f.metadata()["description"].startswith("mean patch-to-patch attention")
        torch.testing.assert_close(f.get_tensor("attention"), shown)
    assert "Last-block mean patch attention" in report.index.read_text()


def test_heads_selection_and_mixed_sizes():
    model = tiny_vit(8)
    a, b = torch.randn(3, 32, 32), torch.randn(3, 40, 24)
    full = attention_maps(model, [a, b])
    picked = attention_maps(model, [a, b], heads=[2, 0])
    assert [tuple(m.shape) for m in full] == [(3, 4, 4), (3, 5, 3)]
    for f, p in zip(full, picked):
        torch.testing.assert_close(p, f[[2, 0]])
    with pytest.raises(dinocli.UsageError, match="3 heads"):
        attention_maps(model, [a], heads=[3])


def test_upsample_nearest_repeats_each_patch():
    maps = torch.rand(2, 3, 4)
    big = upsample(maps, 8)
    assert tuple(big.shape) == (2, 24, 32)
    ys, xs = np.mgrid[0:24, 0:32]
    assert torch.equal(big, maps[:, ys // 8, xs // 8])
    smooth = upsample(maps, 8, "bilinear")
    assert tuple(smooth.shape) == (2, 24, 32) and not torch.equal(smooth, big)


def test_preprocess_resizes_normalises_and_crops_top_left():
    image = blob_image(70, 50, seed=3)
    tensor, photo = preprocess(image, 40, patch_size=16)  # short side 40 -> 56x40 -> crop 48x32
    assert photo.size == (48, 32) and tuple(tensor.shape) == (3, 32, 48)
    resized = np.asarray(image.resize((56, 40), Image.Resampling.BILINEAR))
    assert np.array_equal(np.asarray(photo), resized[:32, :48])
    expected = (resized[:32, :48] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(tensor.permute(1, 2, 0).double().numpy(), expected, atol=1e-5)
    square, _ = preprocess(image, (24, 40), patch_size=8)
    assert tuple(square.shape) == (3, 24, 40)


# -- masks -----------------------------------------------------------------------------------


def check_mask(values: np.ndarray, keep: np.ndarray, threshold: float) -> None:
    total = values.sum()
    kept = values[keep]
    assert kept.size > 0
    assert kept.sum() >= threshold * total * (1 - 1e-9)  # holds at least the asked mass
    assert kept.sum() - kept.min() < threshold * total * (1 + 1e-9)  # one patch fewer would not
    if (~keep).any():
        assert kept.min() >= values[~keep].max()  # it is made of the largest values
    # Independently: the fewest largest values whose running sum reaches the threshold.
    target, running, count = threshold * total, 0.0, 0
    for v in sorted(values.tolist(), reverse=True):
        running, count = running + v, count + 1
        if running >= target:
            break
    near_tie = math.isclose(running - values[keep].min(), target, rel_tol=1e-9) or math.isclose(
        running, target, rel_tol=1e-9
    )
    assert int(keep.sum()) == count or near_tie


def test_mask_hand_example():
    maps = torch.tensor([[[0.1, 0.4], [0.3, 0.2]], [[0.25, 0.25], [0.25, 0.25]]])
    keep = attention_mask(maps, 0.6)
    assert keep[0].tolist() == [[False, True], [True, False]]  # 0.4 + 0.3 = 0.7 >= 0.6
    assert int(keep[1].sum()) == 3  # equal values: 3 x 0.25 is the least that reaches 0.6
    assert attention_mask(maps, 1.0).all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=40),
    st.floats(0.05, 0.95),
)
def test_mask_keeps_the_mass_and_is_minimal(values, threshold):
    arr = np.array(values)
    keep = attention_mask(torch.tensor(arr)[None], threshold)[0].numpy()
    check_mask(arr, keep, threshold)


def test_mask_per_head_on_real_attention():
    maps = attention_maps(tiny_vit(8), [torch.randn(3, 32, 40)])[0]
    keep = attention_mask(maps, 0.6)
    assert keep.shape == maps.shape and keep.dtype == torch.bool
    for head in range(maps.shape[0]):
        check_mask(maps[head].double().numpy().ravel(), keep[head].numpy().ravel(), 0.6)


def test_bad_threshold_is_a_usage_error():
    with pytest.raises(dinocli.UsageError, match="threshold"):
        attention_mask(torch.rand(1, 2, 2), 1.5)


# -- pictures --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["viridis", "inferno", "magma", "gray"])
def test_colormap_interpolates_its_anchors(name):
    table = lookup_table(name).astype(np.float64)
    anchors = anchor_colors(name).astype(np.float64)
    assert table.shape == (256, 3)
    for i in range(256):
        t = i / 255 * (len(anchors) - 1)
        k = min(int(t), len(anchors) - 2)
        want = anchors[k] + (t - k) * (anchors[k + 1] - anchors[k])
        assert np.abs(table[i] - want).max() <= 0.5 + 1e-9
    values = np.array([[2.0, 4.0], [3.0, 6.0]])
    picture = apply_colormap(values, name)
    assert picture.dtype == np.uint8 and picture.shape == (2, 2, 3)
    assert (picture[0, 0] == table[0]).all() and (picture[1, 1] == table[255]).all()
    assert (picture[0, 1] == table[round(2 / 4 * 255)]).all()


def test_unknown_colormap_suggests_a_name():
    with pytest.raises(dinocli.UsageError, match="viridis"):
        lookup_table("viridiss")


def test_overlay_tints_inside_and_outlines_the_edge():
    photo = np.full((12, 12, 3), 100, np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True
    out = overlay_mask(photo, mask, (200, 0, 50), alpha=0.5, outline=1)
    edge = mask_outline(mask, 1)
    assert edge[3, 5] and edge[8, 5] and edge[5, 2] and edge[5, 9] and not edge[5, 5]
    assert edge.sum() == 2 * 8 + 2 * 4
    assert (out[~mask] == 100).all()
    assert (out[edge] == [200, 0, 50]).all()
    inner = mask & ~edge
    assert (out[inner] == [150, 50, 75]).all()


# -- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = tiny_vit(8)
    return save_safetensors(model, tmp_path_factory.mktemp("w") / "vit.safetensors", 8), model


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    blob_image(60, 44, 1).save(folder / "disc.png")
    blob_image(50, 50, 2, mode="L").save(folder / "sub" / "gray.jpg")
    blob_image(40, 52, 3).save(folder / "sub" / "disc.png")  # same stem: a distinct folder
    return folder


def test_cli_writes_every_file_with_the_right_sizes(cli, weights, photo_dir, tmp_path):
    path, model = weights
    out = tmp_path / "out"
    result = cli.invoke(
        app,
        ["attn-maps", "-w", str(path), str(photo_dir), "-o", str(out), "--image-size", "32 48",
         "--threshold", "0.6", "--heads", "0,2"],
    )
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["disc", "disc-2", "gray"]
    for name in folders:
        folder = out / name
        expected = {
            "image.png", "attn-head0.png", "attn-head2.png", "attn-mean.png", "grid.png",
            "mask-th0.6-head0.png", "mask-th0.6-head2.png", "overlay-head0.png",
            "overlay-head2.png", "attention.safetensors",
        }
        assert {p.name for p in folder.iterdir()} == expected
        for png in expected - {"grid.png", "attention.safetensors"}:
            with Image.open(folder / png) as img:
                assert img.size == (48, 32), png
        with Image.open(folder / "grid.png") as grid:
            assert grid.width > 3 * 48 and grid.height > 2 * 32
        with safe_open(str(folder / "attention.safetensors"), framework="pt") as f:
            raw = f.get_tensor("attention")
            meta = f.metadata()
        assert raw.dtype == torch.float32 and tuple(raw.shape) == (2, 4, 6)
        assert json.loads(meta["heads"]) == [0, 2] and meta["patch_size"] == "8"
        # The saved maps are the model's attention of the saved photo.
        with Image.open(folder / "image.png") as img:
            tensor, _ = preprocess(img.convert("RGB"), (32, 48), 8)
        torch.testing.assert_close(raw, attention_maps(model, [tensor], heads=[0, 2])[0])
        # The mask files are the nearest-upsampled masks of the raw maps.
        keep = attention_mask(raw, 0.6)
        for k, head in enumerate((0, 2)):
            with Image.open(folder / f"mask-th0.6-head{head}.png") as img:
                pixels = np.asarray(img)
            assert set(np.unique(pixels)) <= {0, 255}
            ys, xs = np.mgrid[0:32, 0:48]
            assert np.array_equal(pixels == 255, keep[k].numpy()[ys // 8, xs // 8])
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == ["disc/grid.png", "disc-2/grid.png", "gray/grid.png"]
    assert all((out / s).is_file() for s in sources)
    assert "http" not in page and "<script" not in page and "<link" not in page


def test_cli_reads_a_dinocli_training_checkpoint(cli, tmp_path, rgb_image):
    teacher, student = tiny_vit(16, seed=1), tiny_vit(16, seed=2)
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": 16, "img_size": 32}}
    checkpoint = {
        "student": {f"backbone.{k}": v for k, v in student.state_dict().items()}
        | {"head.last_layer.weight": torch.zeros(4, 8)},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
        | {"head.last_layer.weight": torch.zeros(4, 8)},
        "epoch": 1, "iteration": 10, "config": {"arch": "vit_tiny", "patch_size": 16},
        "dinocli.backbone": spec, "dinocli.version": "0.1.0",
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    rgb_image.save(tmp_path / "one.png")
    out = tmp_path / "out"
    result = cli.invoke(
        app,
        ["attn-maps", "--weights", str(tmp_path / "checkpoint.pth"), str(tmp_path / "one.png"),
         "--output", str(out), "--image-size", "32", "--checkpoint-key", "student"],
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "one" / "attention.safetensors"), framework="pt") as f:
        raw = f.get_tensor("attention")
    tensor, _ = preprocess(rgb_image, (32, 32), 16)
    torch.testing.assert_close(raw, attention_maps(student, [tensor])[0])
    assert not torch.allclose(raw, attention_maps(teacher, [tensor])[0])
    assert not (out / "one" / "mask-th0.6-head0.png").exists()  # no masks without --threshold


def test_cli_keep_aspect_any_size(cli, weights, tmp_path):
    path, _ = weights
    blob_image(90, 50, 4).save(tmp_path / "wide.png")
    result = cli.invoke(
        app,
        ["attn-maps", "-w", str(path), str(tmp_path / "wide.png"), "-o", str(tmp_path / "out"),
         "--image-size", "36", "--keep-aspect", "--upsample", "bilinear", "--colormap", "inferno"],
    )
    assert result.exit_code == 0, result.output
    # short side 36 -> 64x36 (90*36/50 = 64.8 -> 64) -> cropped to multiples of 8: 64x32
    with Image.open(tmp_path / "out" / "wide" / "attn-head1.png") as img:
        assert img.size == (64, 32)


@pytest.mark.parametrize(
    "text, sizes",
    [("480", [480]), ("480 640", [480, 640]), ("480x640", [480, 640]), (" 480 X 640 ", [480, 640]),
     ("480,640", [480, 640]), ("480 , 640", [480, 640])],
)
def test_image_size_forms(text, sizes):
    from dinocli.cli.attn_maps import parse_image_size

    assert parse_image_size(text) == sizes


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--heads", "0,3"], "has 3 heads"),
        (["--heads", "a,b"], "--heads"),
        (["--threshold", "1.5"], "--threshold"),
        (["--colormap", "viridiss"], "Did you mean 'viridis'"),
        (["--upsample", "cubic"], "nearest, bilinear"),
        (["--image-size", "abc"], "--image-size"),
        (["--image-size", "32x"], "--image-size '32x': give one number"),
        (["--image-size", "32 48 64"], "--image-size '32 48 64': give one number"),
        (["--image-size", "32 48", "--keep-aspect"], "--keep-aspect"),
        (["--image-size", "4"], "smaller than one 8-pixel patch"),
    ],
)
def test_cli_bad_options_are_one_line_errors(cli, weights, tmp_path, rgb_image, extra, message):
    path, _ = weights
    rgb_image.save(tmp_path / "one.png")
    result = cli.invoke(
        app, ["attn-maps", "-w", str(path), str(tmp_path / "one.png"), "-o", str(tmp_path / "o"), *extra]
    )
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_bad_inputs_are_one_line_errors(cli, weights, tmp_path):
    path, _ = weights
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = [
        ([str(tmp_path / "missing.png")], "not found"),
        ([str(tmp_path / "broken.png")], "cannot read image"),
    ]
    for inputs, message in cases:
        result = cli.invoke(app, ["attn-maps", "-w", str(path), *inputs, "-o", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_broken_image_in_a_folder_is_one_line_before_any_page_is_written(cli, weights, tmp_path, rgb_image):
    path, _ = weights
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):  # more than one batch before it
        rgb_image.save(folder / name)
    (folder / "z_broken.png").write_bytes(b"not a png")
    out = tmp_path / "o"
    result = cli.invoke(app, ["attn-maps", "-w", str(path), str(folder), "-o", str(out), "--batch-size", "2"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read image {folder / 'z_broken.png'}: cannot identify image file '{folder / 'z_broken.png'}'"
    ]
    assert not out.exists()


def test_backbone_without_attention_is_refused_by_name(cli, tmp_path, rgb_image):
    torch.save(dinocli.create_backbone("resnet18").state_dict(), tmp_path / "resnet.pth")
    rgb_image.save(tmp_path / "one.png")
    result = cli.invoke(
        app,
        ["attn-maps", "--weights", str(tmp_path / "resnet.pth"), str(tmp_path / "one.png"),
         "--output", str(tmp_path / "out")],
    )
    assert result.exit_code == 2
    assert "backbone 'resnet18' has no self-attention" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_real_photo_end_to_end(cli, weights, tmp_path):
    photo = PHOTOS / "chelsea_cat.png"
    if not photo.is_file():
        pytest.skip(f"real photos not available at {PHOTOS}")
    path, _ = weights
    out = tmp_path / "out"
    result = cli.invoke(
        app,
        ["attn-maps", "-w", str(path), str(photo), str(PHOTOS / "camera_gray.png"), "-o", str(out),
         "--image-size", "64", "--keep-aspect", "--threshold", "0.6"],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out / "chelsea_cat" / "image.png") as img:  # 451x300 -> 96x64 (rounded down to 8s)
        assert img.size == (96, 64)
    with Image.open(out / "camera_gray" / "overlay-head2.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    assert "chelsea_cat/grid.png" in (out / "index.html").read_text()


def test_python_api_report_from_pil_images(weights, tmp_path):
    from dinocli.visualize import write_attention_pages

    _, model = weights
    seen = []
    report = write_attention_pages(
        model,
        [("a/b", blob_image(40, 40, 5)), ("a/b", blob_image(40, 40, 6))],
        tmp_path / "out",
        image_size=(32, 40),
        heads=[1],
        on_image=seen.append,
    )
    assert [r.name for r in report.images] == ["a_b", "a_b-2"] and seen == report.images
    for r in report.images:
        assert r.size == (32, 40) and r.heads == [1]
        assert set(r.files) == {"image", "attn-head1", "attn-mean", "grid", "attention"}
        assert all(p.is_file() for p in r.files.values())
    assert report.index.read_text().count("<section") == 2


def test_cli_checks_the_output_before_the_model_and_prints_one_line(cli, weights, tmp_path, rgb_image):
    path, _ = weights
    rgb_image.save(tmp_path / "one.png")
    (tmp_path / "afile").write_text("x")
    for weights_path in (tmp_path / "missing.pth", path):  # the output is refused before the model is read
        result = cli.invoke(app, ["attn-maps", "-w", str(weights_path), str(tmp_path / "one.png"),
                                  "-o", str(tmp_path / "afile")])
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [f"error: --output {tmp_path / 'afile'} is a file; give a folder"]
    broken = cli.invoke(app, ["attn-maps", "-w", str(path), str(tmp_path / "one.png"), "-o",
                              str(tmp_path / "o"), "--heads", "7"])
    assert broken.exit_code == 2 and len(broken.stderr.splitlines()) == 1  # no blank line of a progress bar
