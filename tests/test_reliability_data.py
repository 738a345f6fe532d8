"""Bad data: one clear line and the right exit code; odd but valid images just work; bad images
during training are skipped, counted and reported, or stop the run in one line with nothing lost.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import broken_files as bf
from dinocli.cli import app
from dinocli.data import open_rgb

EXTRACT = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--resize", "32",
           "--crop-size", "32", "--num-workers", "0", "--batch-size", "4"]
TINY_TRAIN = ["--arch", "vit_tiny", "--patch-size", "8", "--out-dim", "32", "--global-crop-size", "32",
              "--local-crop-size", "16", "--local-crops-number", "1", "--batch-size", "4",
              "--warmup-epochs", "0", "--precision", "fp32", "--device", "cpu", "--no-progress",
              "--drop-path-rate", "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the machine's cores are shared, and more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def extract(cli, data: Path, out: Path):
    return cli.invoke(app, ["extract", "--data", str(data), "--output", str(out), *EXTRACT])


def pretrain(cli, data: Path, run: Path, *extra: str):
    return cli.invoke(app, ["pretrain", "--data", str(data), "--output", str(run), *TINY_TRAIN, *extra])


# -- folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "error: data folder not found: {data}"),
        ("file", "error: {data} is not a folder"),
        ("empty", "error: no images found under {data} (looked for bmp, jpeg, jpg, png, tif, tiff, webp)"),
        ("no_images", "error: no images found under {data} (looked for bmp, jpeg, jpg, png, tif, tiff, webp)"),
        ("hidden_only", "error: no images found under {data}"),
    ],
)
def test_unusable_data_folders_are_one_line_exit_2(tmp_path, cli, setup, message):
    data = tmp_path / "data"
    if setup == "file":
        data.write_bytes(bf.png_bytes())
    elif setup == "empty":
        data.mkdir()
    elif setup == "no_images":
        (data / "cls").mkdir(parents=True)
        (data / "cls" / "notes.txt").write_text("not an image")
        (data / "cls" / "image.jpg.part").write_bytes(bf.jpeg_bytes())
    elif setup == "hidden_only":
        (data / ".cache").mkdir(parents=True)
        bf.rgb().save(data / ".cache" / "thumb.png")
    previous = tmp_path / "features.safetensors"
    before = bf.previous_features(previous)
    for result in (extract(cli, data, previous), pretrain(cli, data, tmp_path / "run", "--epochs", "1")):
        line = bf.error_line(2, result.exit_code, result.stderr, result.stdout)
        assert line.startswith(message.format(data=data)), line
    assert previous.read_bytes() == before
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


# -- broken images -------------------------------------------------------------------------------

REASONS = {
    "zero_byte": "cannot identify image file",
    "truncated_jpeg": "image file is truncated",
    "truncated_png": "image file is truncated",
    "not_an_image": "cannot identify image file",
    "random_bytes": "cannot identify image file",
    "decompression_bomb": "Image size (3600000000 pixels) exceeds limit of 178956970 pixels",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_broken_image_is_one_line_naming_the_file(tmp_path, cli, kind):
    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    bf.rgb().save(data / "good.png")
    bad = bf.broken_images(tmp_path / "corpus")[kind]
    bad = bad.rename(data / bad.name)
    out = tmp_path / "features.safetensors"
    before = bf.previous_features(out)
    result = extract(cli, tmp_path / "data", out)
    line = bf.error_line(2, result.exit_code, result.stderr, result.stdout)
    assert line.startswith(f"error: cannot read image {bad}: ")
    assert REASONS[kind] in line
    assert out.read_bytes() == before  # nothing written over the previous output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data", "features.safetensors"]


def test_a_bomb_is_refused_before_its_pixels_are_allocated(tmp_path):
    bomb = bf.decompression_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000  # a tiny file...
    with Image.open(bf.decompression_bomb(tmp_path / "fine.png", side=64)) as img:
        assert img.size == (64, 64)  # ...of a format PIL reads: only the size is refused
    with pytest.raises(Image.DecompressionBombError, match="could be decompression bomb"):
        open_rgb(bomb)


def test_the_device_decoder_treats_a_bomb_as_an_undecodable_image(tmp_path):
    """Bytes that are not a JPEG reach the decoder's PIL fallback, which must refuse a bomb as it
    refuses a broken file: ``None``, not an exception (the workers refuse bombs before sending)."""
    from dinocli.augmentations.device import decode

    bomb = torch.frombuffer(bytearray(bf.decompression_bomb(tmp_path / "bomb.png").read_bytes()), dtype=torch.uint8)
    good = torch.frombuffer(bytearray(bf.jpeg_bytes()), dtype=torch.uint8)
    decoded = decode([good, bomb], torch.device("cpu"))
    assert decoded[0] is not None and decoded[0].dtype == torch.uint8 and decoded[0].shape[0] == 3
    assert decoded[1] is None


def test_large_images_decode_without_a_warning_on_every_data_path(tmp_path, monkeypatch):
    """Between PIL's pixel limit and twice that, PIL decodes and warns once per file (from every
    worker); every data set decodes such an image as it is, silently."""
    from dinocli.augmentations.device import decode
    from dinocli.data.multicrop_dataset import MultiCropDataset
    from dinocli.evaluate.extract import _Encoded, _Images
    from dinocli.registry import create_augmentation

    path, png = tmp_path / "large.jpg", tmp_path / "large.png"  # a PNG: the device decoder's PIL fallback
    bf.rgb().save(path)
    bf.rgb().save(png)
    with Image.open(path) as img:
        pixels = img.width * img.height
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels * 2 // 3)  # "large" now, not a bomb
    with pytest.warns(Image.DecompressionBombWarning):
        open_rgb(path)  # PIL's own behaviour, as the data sets meet it
    aug = create_augmentation("dino", global_crop_size=32, local_crop_size=16, local_crops_number=1)
    to_tensor = lambda image: torch.from_numpy(np.array(image))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning fails the item
        items = {
            "multi-crop": MultiCropDataset([path], aug, on_bad_image="fail")[0],
            "levels": MultiCropDataset([path], aug, on_bad_image="fail", levels=True)[0],
            "on device": MultiCropDataset([path], aug, on_bad_image="fail", on_device=True)[0],
            "extract": _Images([path], to_tensor)[0],
            "extract on device": _Encoded([path], to_tensor)[0],
            "device decoder's fallback": decode([torch.frombuffer(bytearray(png.read_bytes()), dtype=torch.uint8)],
                                                torch.device("cpu"))[0],
        }
    for name, item in items.items():
        assert item is not None and not isinstance(item, str), f"{name}: {item}"


# -- odd but valid images --------------------------------------------------------------------------


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as an independent formula (integer arithmetic, rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return (r * 299 + g * 587 + b * 114 + 500) // 1000


def test_every_mode_decodes_to_the_expected_rgb(tmp_path):
    base = bf.pixels(40, 36, seed=3)
    paths = {p.name: p for p in bf.write_odd_mode_images(tmp_path, 40, 36, seed=3)}
    decoded = {name: np.asarray(open_rgb(path)) for name, path in paths.items()}
    for name, img in decoded.items():
        assert img.shape == (36, 40, 3) and img.dtype == np.uint8, name
    gray = luma(base)
    # 8-bit gray is the luma of the original; 16-bit gray (the red channel v stored as v * 257)
    # comes back as v
    for name, expected in (("gray.png", gray), ("gray_alpha.png", gray), ("gray16.png", base[..., 0]),
                           ("gray16.tif", base[..., 0])):
        img = decoded[name].astype(np.int64)
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all(), name
        assert np.abs(img[..., 0] - expected).max() <= 1, name
    # alpha is dropped, the colour kept exactly
    assert np.array_equal(decoded["rgba.png"], base)
    # 1-bit: black or white only, where the gray is dark or light
    bilevel = decoded["bilevel.png"][..., 0]
    assert set(np.unique(bilevel)) <= {0, 255}
    assert bilevel[gray < 64].mean() < 64 and bilevel[gray > 192].mean() > 192
    # palettes: each pixel is the palette colour its index names (transparency dropped)
    for name in ("palette.png", "palette.bmp", "palette_transparent.png"):
        with Image.open(paths[name]) as raw:
            assert raw.mode == "P"
            indices, palette = np.asarray(raw), np.asarray(raw.getpalette(), np.uint8).reshape(-1, 3)
        assert np.array_equal(decoded[name], palette[indices]), name
    # CMYK (lossless TIFF): exact; JPEG: close
    assert np.abs(decoded["cmyk.tif"].astype(int) - base).max() <= 1
    assert np.abs(decoded["cmyk.jpg"].astype(int) - base).mean() < 12
    # 32-bit integer and float images are stretched from their min..max to 0..255
    source = (base[..., 0].astype(np.float64) * 257)
    expected = (source - source.min()) * 255.0 / (source.max() - source.min())
    for name in ("int32.tif", "float32.tif"):
        assert np.abs(decoded[name][..., 0].astype(float) - expected).max() <= 1.0, name


def test_odd_modes_and_tiny_images_just_work_in_extract(tmp_path, cli):
    data = tmp_path / "data"
    names = [p.name for p in bf.write_odd_mode_images(data / "odd")]
    bf.rgb(5, 7).save(data / "odd" / "tiny.png")  # much smaller than the 32 px crop
    bf.rgb(200, 3).save(data / "odd" / "sliver.png")
    result = extract(cli, data, tmp_path / "f.safetensors")
    assert result.exit_code == 0, result.output
    features = load_file(str(tmp_path / "f.safetensors"))["features"]
    assert features.shape == (len(names) + 2, 192) and torch.isfinite(features).all()


# -- bad images during training --------------------------------------------------------------------


def training_folder(root: Path) -> tuple[Path, list[Path]]:
    """8 good images (odd modes, one smaller than the crop) and 4 broken ones: 12 = 3 batches of 4."""
    good = [p for p in bf.write_odd_mode_images(root / "good") if p.name in
            ("gray16.png", "cmyk.jpg", "palette_transparent.png", "rgba.png", "float32.tif")]
    for i in range(2):
        bf.rgb(44, 38, seed=10 + i).save(root / "good" / f"rgb{i}.png")
    bf.rgb(9, 11, seed=20).save(root / "good" / "tiny.png")
    corpus = bf.broken_images(root / "bad")
    bad = [corpus[k] for k in ("zero_byte", "truncated_jpeg", "not_an_image", "decompression_bomb")]
    for path in set(corpus.values()) - set(bad):
        path.unlink()
    return root, bad


def test_bad_images_are_skipped_counted_and_reported_and_the_run_goes_on(tmp_path, cli):
    data, bad = training_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = pretrain(cli, data, run, "--epochs", "2", "--num-workers", "0", "--on-bad-image", "skip")
    assert result.exit_code == 0, result.output
    # every image is seen once per epoch (12 images, 3 batches of 4), so 4 are skipped per epoch
    assert "epoch 1/2 done: " in result.stderr and "epoch 2/2 done: " in result.stderr
    for epoch in (1, 2):
        line = next(x for x in result.stderr.splitlines() if x.startswith(f"epoch {epoch}/2 done: "))
        assert line.endswith(", 4 unreadable image(s) skipped"), line
    assert "8 unreadable image(s) were skipped in this run" in result.stderr
    named = [x for x in result.stderr.splitlines() if x.startswith("warning: skipped unreadable image ")]
    assert sorted(x.split(" ")[4].rstrip(":") for x in named) == sorted(str(p) for p in bad)  # each once
    assert "Traceback" not in result.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records if r.get("summary") == "epoch"] == [4, 4]
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["skipped_images"]) == (2, 8)
    for path in bad:  # the data is left as it was
        assert path.exists()


def test_on_bad_image_fail_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, cli):
    data = tmp_path / "data"
    (data / "good").mkdir(parents=True)
    for i in range(8):
        bf.rgb(40, 36, seed=i).save(data / "good" / f"{i}.png")
    run = tmp_path / "run"
    first = pretrain(cli, data, run, "--epochs", "1", "--num-workers", "0")
    assert first.exit_code == 0, first.output
    before = (run / "checkpoint.pth").read_bytes()

    bad = bf.zero_byte(data / "good" / "3_broken.jpg")
    # a data-loading worker process raises it: the message still arrives as one line
    result = pretrain(cli, data, run, "--epochs", "2", "--num-workers", "1", "--on-bad-image", "fail")
    line = bf.error_line(1, result.exit_code, result.stderr, result.stdout)
    assert line == f"error: cannot decode image {bad}: cannot identify image file {str(bad)!r}"
    assert "resuming from" in result.stderr
    assert (run / "checkpoint.pth").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", "config.toml", "metrics.jsonl"]
