"""The fast CPU path of the ``dino`` augmentation: the same random parameters as the exact path,
pixels close to the reference's, operation frequencies measured on its outputs, and JPEG decoding
at reduced size only where every crop allows it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import dinocli
from dinocli.augmentations.multicrop import IMAGENET_MEAN, IMAGENET_STD
from dinocli.data import load_rgb, open_rgb
from dinocli.data.multicrop_dataset import MultiCropDataset

from conftest import make_rgb_image


def to_levels(view: torch.Tensor) -> torch.Tensor:
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return torch.round((view * std + mean) * 255)


def binomial_ok(hits: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-12


def small(**kwargs):
    return dinocli.create_augmentation(
        "dino", global_crop_size=32, local_crop_size=16, local_crops_number=4, **kwargs
    )


def test_fast_path_applies_exactly_the_sampled_parameters():
    aug, image = small(), make_rgb_image(56, 44, seed=1)
    for seed in range(5):
        views = aug(image, torch.Generator().manual_seed(seed))
        params = aug.sample(44, 56, torch.Generator().manual_seed(seed))
        again = aug.colour(aug.crops(image, params), params)
        assert all(torch.equal(a, b) for a, b in zip(views, again))
        assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)


def test_fast_path_is_close_to_the_exact_reference_path():
    """Same parameters; torch's resize kernel and float colour arithmetic against PIL's bytes."""
    fast, exact = small(), small(pil_resize=True)
    image = make_rgb_image(56, 44, seed=4)
    per_view = []
    for seed in range(20):
        a = fast(image, torch.Generator().manual_seed(seed))
        b = exact(image, torch.Generator().manual_seed(seed))
        per_view += [float((to_levels(x) - to_levels(y)).abs().mean()) for x, y in zip(a, b)]
    assert max(per_view) < 2.0 and np.mean(per_view) < 1.0, (max(per_view), np.mean(per_view))


def test_solarisation_only_on_the_second_global_view_with_probability_0_2():
    """A constant level-250 image stays >= 150 through jitter, grey and blur, so a view is
    solarised exactly when its level ends below 128."""
    aug = dinocli.create_augmentation("dino", global_crop_size=8, local_crop_size=8, local_crops_number=2)
    image = Image.new("RGB", (16, 16), (250, 250, 250))
    n, counts = 1500, np.zeros(4, dtype=int)
    g = torch.Generator().manual_seed(2)
    for _ in range(n):
        counts += [int(to_levels(v).mean() < 128) for v in aug(image, g)]
    assert counts[0] == 0 and counts[2] == 0 and counts[3] == 0
    assert binomial_ok(int(counts[1]), n, 0.2)


# --- decoding at reduced size ------------------------------------------------------------------


def big_jpeg(path, width=1280, height=960):
    yy, xx = np.mgrid[0:height, 0:width]
    wave = 127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0)  # photo-like: no sharp edges
    pixels = np.stack([xx * 255 / width, yy * 255 / height, wave], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
    return path


def test_load_rgb_reduces_jpegs_only(tmp_path):
    jpeg = big_jpeg(tmp_path / "a.jpg")
    with Image.open(jpeg) as img:
        assert load_rgb(img, 4).size == (320, 240)
    make_rgb_image(64, 48).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as img:
        assert load_rgb(img, 4).size == (64, 48)  # not a JPEG: full size


def test_draft_factor_keeps_every_crop_at_least_its_output_size():
    aug = dinocli.create_augmentation("dino", global_crop_size=64, local_crop_size=32, local_crops_number=4)
    g = torch.Generator().manual_seed(0)
    factors = []
    for _ in range(200):
        params = aug.plan((1280, 960), g)
        f = aug.draft_factor(params)
        factors.append(f)
        sides = [(min(p.height, p.width), spec.size) for spec, p in zip(aug.specs, params)]
        assert all(side >= f * size for side, size in sides)  # nothing upscaled because of the draft
        if f < 8:  # and the next factor would have been too much for some crop
            assert any(side < 2 * f * size for side, size in sides)
    assert max(factors) >= 2
    # default crop sizes on a 224-px image: never reduced
    default = dinocli.create_augmentation("dino")
    assert {default.draft_factor(default.plan((224, 224), g)) for _ in range(50)} == {1}


def test_reduced_decoding_gives_nearly_the_same_views(tmp_path):
    jpeg = big_jpeg(tmp_path / "a.jpg")
    aug = dinocli.create_augmentation("dino", global_crop_size=64, local_crop_size=32, local_crops_number=2)
    ds = MultiCropDataset([jpeg], aug, seed=1)
    for epoch in range(4):
        ds.set_epoch(epoch)
        params = aug.plan((1280, 960), ds.generator(0))
        full = aug.colour(aug.crops(open_rgb(jpeg), params), params)
        reduced = ds[0]
        diffs = [float((to_levels(a) - to_levels(b)).abs().mean()) for a, b in zip(full, reduced)]
        assert max(diffs) < 4.0, (aug.draft_factor(params), diffs)  # mean levels per view


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_reduced_decoding_of_other_jpeg_modes(tmp_path, mode):
    path = tmp_path / "m.jpg"
    Image.open(big_jpeg(tmp_path / "rgb.jpg")).convert(mode).save(path)
    aug = dinocli.create_augmentation("dino", global_crop_size=32, local_crop_size=16, local_crops_number=1)
    views = MultiCropDataset([path], aug)[0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)]
    assert all(torch.isfinite(v).all() for v in views)


def test_freed_memory_is_kept_for_reuse_unless_the_environment_says_otherwise(monkeypatch):
    """``mallopt`` is set where glibc has it, and malloc settings from the environment are kept."""
    import platform

    from dinocli.augmentations import ops

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert ops.reuse_freed_memory.__wrapped__() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ops.reuse_freed_memory.__wrapped__() is True
