"""The built-in ``dino`` multi-crop augmentation: numerics against torchvision's PIL path, and the
sampled distributions against the reference's probabilities and analytic crop statistics."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

import dinocli
from dinocli.augmentations import ops
from dinocli.augmentations.multicrop import IMAGENET_MEAN, IMAGENET_STD, DinoMultiCrop
from dinocli.augmentations.params import ColorJitterParams, ViewParams
from dinocli.data import open_rgb
from dinocli.errors import UsageError

from conftest import make_rgb_image

LOG_R = math.log(4 / 3)
IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette224_sub"


def small_aug(n_local: int = 3) -> DinoMultiCrop:
    return dinocli.create_augmentation(
        "dino", global_crop_size=32, local_crop_size=16, local_crops_number=n_local
    )


def to_levels(view: torch.Tensor) -> torch.Tensor:
    """A normalised view back to its 0-255 pixel levels."""
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return torch.round((view * std + mean) * 255)


def binomial_ok(hits: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-12


def sample_many(aug: DinoMultiCrop, n: int, height: int = 224, width: int = 224, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [aug.sample(height, width, g) for _ in range(n)]


# --- the plugin -------------------------------------------------------------------------------


def test_registered_as_plugin_with_defaults(fresh_registry):
    assert "dino" in dinocli.list_augmentations()
    aug = dinocli.create_augmentation("dino", some_future_option=1)  # unknown kwargs are ignored
    assert isinstance(aug, dinocli.Augmentation)
    assert (aug.n_global, aug.n_local) == (2, 8)
    assert [s.size for s in aug.specs] == [224, 224] + [96] * 8
    assert aug.specs[0].scale == (0.4, 1.0) and aug.specs[-1].scale == (0.05, 0.4)
    assert (aug.mean, aug.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_crops_scale": (0.5, 0.2)}, "global_crops_scale must satisfy 0 < min <= max <= 1"),
        ({"local_crops_scale": (0.05,)}, "local_crops_scale must be two numbers"),
        ({"local_crops_number": -1}, "local_crops_number must be a whole number >= 0"),
        ({"global_crop_size": 0}, "global_crop_size must be a positive whole number"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"mean": (0.5, 0.5)}, "mean must be three numbers"),
    ],
)
def test_bad_parameters_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        dinocli.create_augmentation("dino", **kwargs)


# --- numerics: the same bytes as torchvision's PIL transforms --------------------------------


@pytest.mark.parametrize("box", [(3, 5, 20, 30), (0, 0, 40, 48), (10, 2, 7, 9), (1, 1, 37, 13), (4, 9, 32, 9)])
@pytest.mark.parametrize("size", [32, 16])
def test_resized_crop_is_pils_crop_and_bicubic_resize(rgb_image, box, size):
    top, left, h, w = box
    expected = rgb_image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    src = ops.image_to_uint8(rgb_image)
    assert ops.resized_crop(src, top, left, h, w, size, pil=True).tobytes() == expected.tobytes()
    # torch's kernel: the same filter, weights rounded differently
    fast = np.array(ops.resized_crop(src, top, left, h, w, size), dtype=int)
    diff = np.abs(fast - np.array(expected, dtype=int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.0, 1.17, 1.4])
def test_brightness_contrast_saturation_match_torchvision(rgb_image, factor):
    for ours, theirs in (
        (ops.adjust_brightness, TF.adjust_brightness),
        (ops.adjust_contrast, TF.adjust_contrast),
        (ops.adjust_saturation, TF.adjust_saturation),
    ):
        assert ours(rgb_image, factor).tobytes() == theirs(rgb_image, factor).tobytes()


@pytest.mark.parametrize("factor", [-0.1, -0.0371, 0.0, 0.002, 0.05, 0.1])
def test_hue_matches_torchvision(rgb_image, factor):
    assert ops.adjust_hue(rgb_image, factor).tobytes() == TF.adjust_hue(rgb_image, factor).tobytes()


def test_solarize_and_blur_match_pil(rgb_image):
    assert ops.solarize(rgb_image).tobytes() == ImageOps.solarize(rgb_image, 128).tobytes()
    gray = rgb_image.convert("L")
    assert ops.solarize(gray).tobytes() == ImageOps.solarize(gray, 128).tobytes()
    for sigma in (0.1, 0.77, 2.0):
        expected = rgb_image.filter(ImageFilter.GaussianBlur(radius=sigma))
        assert ops.gaussian_blur(rgb_image, sigma).tobytes() == expected.tobytes()


def reference_view(image: Image.Image, size: int, p: ViewParams) -> torch.Tensor:
    """One view with torchvision's PIL functional ops, in the reference implementation's order."""
    img = TF.resized_crop(image, p.top, p.left, p.height, p.width, [size, size], TF.InterpolationMode.BICUBIC)
    if p.flip:
        img = TF.hflip(img)
    if p.jitter is not None:
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = (p.jitter.brightness, p.jitter.contrast, p.jitter.saturation, p.jitter.hue)
        for k in p.jitter.order:
            img = fns[k](img, factors[k])
    if p.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p.blur_sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        img = ImageOps.solarize(img)
    return TF.normalize(TF.to_tensor(img), list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_whole_pipeline_equals_torchvision_reference_for_the_sampled_parameters():
    aug = dinocli.create_augmentation(
        "dino", global_crop_size=32, local_crop_size=16, local_crops_number=4, pil_resize=True
    )
    image = make_rgb_image(56, 44, seed=3)
    seen = Counter()
    for seed in range(40):
        views = aug(image, torch.Generator().manual_seed(seed))
        params = aug.sample(image.height, image.width, torch.Generator().manual_seed(seed))
        for spec, p, got in zip(aug.specs, params, views):
            torch.testing.assert_close(got, reference_view(image, spec.size, p), rtol=0, atol=2e-6)
            seen.update(f for f in ("flip", "jitter", "grayscale", "blur_sigma", "solarize") if getattr(p, f))
    assert min(seen.values()) >= 5, seen  # every operation was exercised


def test_default_resize_stays_close_to_the_reference():
    image = make_rgb_image(56, 44, seed=4)
    fast = small_aug(n_local=4)
    exact = dinocli.create_augmentation(
        "dino", global_crop_size=32, local_crop_size=16, local_crops_number=4, pil_resize=True
    )
    for seed in range(10):
        a = fast(image, torch.Generator().manual_seed(seed))
        b = exact(image, torch.Generator().manual_seed(seed))
        diff = torch.stack([(to_levels(x) - to_levels(y)).abs().mean() for x, y in zip(a, b)])
        assert diff.max() < 2.0, diff  # mean difference per view, in grey levels


def test_forced_operations_apply(rgb_image):
    """Each operation, forced on alone, changes the view exactly as its PIL counterpart does
    (``pil_resize=True``: the exact path; the fast path is compared in test_augmentation_fast.py)."""
    aug = dinocli.create_augmentation(
        "dino", global_crop_size=32, local_crop_size=16, local_crops_number=0, pil_resize=True
    )
    plain = ViewParams(0, 0, 40, 48, False, None, False, None, False)
    base = ops.resized_crop(ops.image_to_uint8(rgb_image), 0, 0, 40, 48, 32, pil=True)  # aug's resize

    def view(**changes):
        return aug.apply(rgb_image, [ViewParams(**{**plain.__dict__, **changes})] * 2)[0]

    def norm(img):
        return TF.normalize(TF.to_tensor(img), list(IMAGENET_MEAN), list(IMAGENET_STD))

    torch.testing.assert_close(view(), norm(base), rtol=0, atol=2e-6)
    torch.testing.assert_close(view(flip=True), norm(base).flip(-1), rtol=0, atol=2e-6)
    gray = view(grayscale=True)
    levels = to_levels(gray)
    assert torch.equal(levels[0], levels[1]) and torch.equal(levels[1], levels[2])
    assert torch.equal(levels[0], torch.from_numpy(np.array(base.convert("L"))).float())
    raw = torch.from_numpy(np.array(base)).permute(2, 0, 1).float()
    assert torch.equal(to_levels(view(solarize=True)), torch.where(raw >= 128, 255 - raw, raw))
    blurred = view(blur_sigma=2.0)
    assert blurred.std() < view().std()  # a blur reduces the pixel variance
    jitter = ColorJitterParams((3, 2, 1, 0), 1.4, 0.6, 1.2, 0.1)
    torch.testing.assert_close(
        view(jitter=jitter),
        norm(
            TF.adjust_brightness(
                TF.adjust_contrast(TF.adjust_saturation(TF.adjust_hue(base, 0.1), 1.2), 0.6), 1.4
            )
        ),
        rtol=0,
        atol=2e-6,
    )


def test_output_shapes_dtype_and_normalisation():
    aug = dinocli.create_augmentation(
        "dino",
        global_crop_size=40,
        local_crop_size=24,
        local_crops_number=5,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.25, 1.0),
    )
    views = aug(make_rgb_image(64, 48), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * 5
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
    # (x - 0.5) / std for x in [0, 1]: the bounds per channel
    for v in views:
        for c, s in enumerate((0.5, 0.25, 1.0)):
            assert -0.5 / s - 1e-6 <= v[c].min() and v[c].max() <= 0.5 / s + 1e-6


# --- reproducibility --------------------------------------------------------------------------


def test_same_seed_same_crops_different_seed_different_crops(rgb_image):
    aug = small_aug()
    a = aug(rgb_image, torch.Generator().manual_seed(7))
    b = aug(rgb_image, torch.Generator().manual_seed(7))
    c = aug(rgb_image, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_uses_no_global_random_state(rgb_image):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    small_aug()(rgb_image, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_one_block_of_randomness_per_image_whatever_the_branches():
    """Every image advances the generator by the same amount (the image size does not matter)."""
    aug = small_aug()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug.sample(224, 224, g1)
    aug.sample(30, 900, g2)  # a shape that always takes the fallback centre crop
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16", "I", "F", "1"])
def test_any_image_mode_works(tmp_path, mode):
    rgb = make_rgb_image(40, 36, seed=1)
    if mode == "I;16":
        img = Image.fromarray((np.array(rgb.convert("L"), dtype=np.uint16) * 257))
    elif mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
    else:
        img = rgb.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "F", "I;16", "I") else "PNG"
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt)
    views = small_aug()(open_rgb(path), torch.Generator().manual_seed(0))
    assert len(views) == 5 and all(torch.isfinite(v).all() for v in views)
    # a call with the image in its own mode converts it too
    assert len(small_aug()(img, torch.Generator().manual_seed(0))) == 5


# --- distributions ----------------------------------------------------------------------------


def test_local_crop_area_and_aspect_ratio_follow_random_resized_crop():
    """Local crops (scale 0.05-0.4) of a square image always fit:
    area fraction ~ U(0.05, 0.4), log aspect ratio ~ U(-log 4/3, log 4/3)."""
    aug = dinocli.create_augmentation("dino", local_crops_number=4)
    side = 2000  # large, so that rounding the box to whole pixels is negligible
    views = [p for params in sample_many(aug, 2500, side, side) for p in params[2:]]
    area = np.array([p.height * p.width / side**2 for p in views])
    log_ratio = np.array([math.log(p.width / p.height) for p in views])
    q = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(np.quantile(area, q), 0.05 + 0.35 * q, atol=0.01)
    np.testing.assert_allclose(np.quantile(log_ratio, q), -LOG_R + 2 * LOG_R * q, atol=0.012)
    assert abs(area.mean() - 0.225) < 0.004 and abs(log_ratio.mean()) < 0.006
    # the box is placed uniformly over the free positions
    rel_top = np.array([p.top / (side - p.height) for p in views])
    rel_left = np.array([p.left / (side - p.width) for p in views])
    assert abs(rel_top.mean() - 0.5) < 0.015 and abs(rel_left.mean() - 0.5) < 0.015
    np.testing.assert_allclose(np.quantile(rel_left, q), q, atol=0.02)


def test_global_crops_follow_the_conditional_distribution_of_accepted_boxes():
    """Scale 0.4-1 on a square image: an attempt is accepted iff s <= exp(-|log r|). The accepted
    (s, log r) pairs are uniform over that region; compare the moments with numerical integrals."""
    aug = small_aug(n_local=0)
    side = 2000
    views = [p for params in sample_many(aug, 5000, side, side) for p in params]
    area = np.array([p.height * p.width / side**2 for p in views])
    abs_log_ratio = np.array([abs(math.log(p.width / p.height)) for p in views])
    # region {(s, l): 0.4 <= s <= exp(-|l|), |l| <= log 4/3}; integrate over l on a fine grid
    l = np.linspace(0, LOG_R, 200001)
    top = np.exp(-l)
    weight = top - 0.4  # length of the accepted s-interval at each l
    mass = np.trapezoid(weight, l)
    mean_s = np.trapezoid((top**2 - 0.16) / 2, l) / mass
    mean_abs_l = np.trapezoid(l * weight, l) / mass
    p_s_above_09 = np.trapezoid(np.clip(top - 0.9, 0, None), l) / mass
    assert abs(area.mean() - mean_s) < 0.004, (area.mean(), mean_s)
    assert abs(abs_log_ratio.mean() - mean_abs_l) < 0.004, (abs_log_ratio.mean(), mean_abs_l)
    assert binomial_ok(int((area > 0.9).sum()), len(area), p_s_above_09)
    assert area.min() >= 0.4 - 1e-3 and area.max() <= 1.0


def test_fallback_is_the_largest_centred_box_with_an_allowed_ratio():
    aug = small_aug(n_local=0)  # scale >= 0.4 never fits a 4:1 panorama at a ratio <= 4/3
    boxes = {(p.top, p.left, p.height, p.width) for params in sample_many(aug, 50, 500, 2000) for p in params}
    assert boxes == {(0, (2000 - 667) // 2, 500, 667)}
    boxes = {(p.top, p.left, p.height, p.width) for params in sample_many(aug, 50, 2000, 500) for p in params}
    assert boxes == {((2000 - 667) // 2, 0, 667, 500)}


def test_operation_frequencies_per_view():
    n = 6000
    aug = dinocli.create_augmentation("dino", local_crops_number=2)
    samples = sample_many(aug, n)
    g1, g2, locals_ = [s[0] for s in samples], [s[1] for s in samples], [p for s in samples for p in s[2:]]
    for views in (g1, g2, locals_):
        m = len(views)
        assert binomial_ok(sum(p.flip for p in views), m, 0.5)
        assert binomial_ok(sum(p.jitter is not None for p in views), m, 0.8)
        assert binomial_ok(sum(p.grayscale for p in views), m, 0.2)
    assert all(p.blur_sigma is not None for p in g1)
    assert binomial_ok(sum(p.blur_sigma is not None for p in g2), n, 0.1)
    assert binomial_ok(sum(p.blur_sigma is not None for p in locals_), 2 * n, 0.5)
    assert binomial_ok(sum(p.solarize for p in g2), n, 0.2)
    assert not any(p.solarize for p in g1 + locals_)
    # the operations are drawn independently of each other
    both = sum(p.flip and p.grayscale for p in locals_)
    assert binomial_ok(both, 2 * n, 0.5 * 0.2)


def test_blur_sigma_and_jitter_factor_ranges():
    samples = sample_many(small_aug(n_local=4), 4000)
    views = [p for s in samples for p in s]
    # Sigmas are in pixels: the reference's 0.1-2.0 (for 224-px crops) scales with 32-px crops.
    factor = 32 / 224
    sigma = np.array([p.blur_sigma for p in views if p.blur_sigma is not None]) / factor
    assert sigma.min() >= 0.1 - 1e-9 and sigma.max() <= 2.0 + 1e-9
    np.testing.assert_allclose(np.quantile(sigma, [0.01, 0.5, 0.99]), [0.119, 1.05, 1.981], atol=0.03)
    reference = dinocli.create_augmentation("dino")
    assert all(spec.blur_sigma == (0.1, 2.0) for spec in reference.specs)
    given = dinocli.create_augmentation("dino", global_crop_size=32, blur_sigma=(0.5, 1.0))
    assert all(spec.blur_sigma == (0.5, 1.0) for spec in given.specs)
    jit = [p.jitter for p in views if p.jitter is not None]
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    q = np.array([0.01, 0.5, 0.99])
    for name, (lo, hi) in ranges.items():
        x = np.array([getattr(j, name) for j in jit])
        assert x.min() >= lo and x.max() <= hi
        np.testing.assert_allclose(np.quantile(x, q), lo + (hi - lo) * q, atol=0.015 * (hi - lo))
    orders = Counter(j.order for j in jit)
    assert len(orders) == 24  # every order of the four ops appears, about equally often
    assert all(binomial_ok(c, len(jit), 1 / 24) for c in orders.values())


def test_frequencies_seen_in_the_pixels():
    """Grayscale (equal channels) and flip (a left-to-right ramp reversed) measured on outputs."""
    aug = dinocli.create_augmentation("dino", global_crop_size=12, local_crop_size=8, local_crops_number=2)
    colourful = make_rgb_image(32, 32, seed=5)
    ramp = Image.fromarray(np.tile(np.linspace(0, 100, 64).astype(np.uint8), (32, 1))).convert("RGB")
    n, gray, flips = 300, 0, 0
    g = torch.Generator().manual_seed(11)
    for _ in range(n):
        views = aug(colourful, g)
        gray += sum(bool(torch.equal(to_levels(v)[0], to_levels(v)[1])) for v in views)
        first = aug(ramp, g)[0][0]  # view 1 is never solarised: brightness, contrast, blur keep the order
        flips += bool(first[:, :6].mean() > first[:, 6:].mean())
    assert binomial_ok(gray, 4 * n, 0.2)
    assert binomial_ok(flips, n, 0.5)


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"real images not found at {IMAGENETTE}")
def test_real_photos_default_sizes():
    paths = sorted((IMAGENETTE / "val").rglob("*.JPEG"))[:2]
    aug = dinocli.create_augmentation("dino")
    for path in paths:
        views = aug(open_rgb(path), torch.Generator().manual_seed(0))
        assert [tuple(v.shape[1:]) for v in views] == [(224, 224)] * 2 + [(96, 96)] * 8
