"""Batched, per-view colour operations (dinocli.augmentations.gpu): each one against its PIL
counterpart within stated tolerances, the blur kernel against PIL's box-filter construction, batching
that never mixes views (the whole ``--augment-on gpu`` path is tested in test_gpu_device_views.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

import dinocli
from dinocli.augmentations import gpu
from dinocli.augmentations.gpu import ColourParams
from dinocli.augmentations.params import ColorJitterParams, ViewParams

from conftest import make_rgb_image


def levels(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as float levels ``[1, 3, H, W]``."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).unsqueeze(0).float()


def diff(ours: torch.Tensor, pil: Image.Image) -> torch.Tensor:
    return (ours[0] - levels(pil)[0]).abs()


@pytest.fixture
def photo() -> Image.Image:
    return make_rgb_image(64, 48, seed=2)


def one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


# --- each operation against PIL (torchvision's PIL functions) ---------------------------------


@pytest.mark.parametrize("factor", [0.6, 0.87, 1.0, 1.23, 1.4])
def test_brightness_contrast_saturation_within_one_level_of_pil(photo, factor):
    x = levels(photo)
    for ours, theirs in (
        (gpu.adjust_brightness, TF.adjust_brightness),
        (gpu.adjust_contrast, TF.adjust_contrast),
        (gpu.adjust_saturation, TF.adjust_saturation),
    ):
        d = diff(ours(x.clone(), one(factor)), theirs(photo, factor))
        assert d.max() <= 1 and d.mean() < 0.05, (ours.__name__, d.max(), d.mean())


@pytest.mark.parametrize("factor", [-0.1, -0.043, 0.0, 0.004, 0.061, 0.1])
def test_hue_close_to_pil(photo, factor):
    """PIL quantises hue and saturation to 8 bits (an error of up to 6 levels on saturated
    pixels); we do not. On this noisy, saturated image: < 1 level on average, > 6 levels on < 2 %
    of the values, never more than 12."""
    d = diff(gpu.adjust_hue(levels(photo), one(factor)), TF.adjust_hue(photo, factor))
    assert d.mean() < 1.0 and d.max() <= 12, (d.mean(), d.max())
    assert (d > 6).float().mean() < 0.02


def test_hue_shift_is_a_rotation_of_the_hsv_hue():
    """Pure colours move around the hue circle: red + 1/3 turn -> green, + 2/3 -> blue (in whole
    1/255 turns, as PIL: 85/255 of a turn is exactly a third)."""
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert gpu.adjust_hue(red, one(85 / 255 + 1e-9)).view(3).tolist() == [0.0, 255.0, 0.0]
    assert gpu.adjust_hue(red, one(-85 / 255 - 1e-9)).view(3).tolist() == [0.0, 0.0, 255.0]
    grey = torch.full((1, 3, 2, 2), 77.0)  # no chroma: unchanged
    assert torch.equal(gpu.adjust_hue(grey, one(0.1)), grey)


def test_grayscale_and_solarize_match_pil(photo):
    x = levels(photo)
    assert diff(gpu.to_grayscale(x), TF.rgb_to_grayscale(photo, 3)).max() <= 1
    assert diff(gpu.solarize(x), ImageOps.solarize(photo, 128)).max() == 0


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.0, 1.5, 2.0])
def test_blur_kernel_is_pils_three_box_filters(sigma):
    """Three extended boxes of variance sigma^2/3 each: the kernel sums to 1, is symmetric and has
    variance sigma^2 (Gwosdek et al. 2011, the construction Pillow uses)."""
    k = gpu.pil_blur_kernel(sigma)
    pos = torch.arange(len(k), dtype=torch.float64) - len(k) // 2
    assert len(k) % 2 == 1 and torch.allclose(k, k.flip(0))
    assert abs(float(k.sum()) - 1) < 1e-12
    assert abs(float((k * pos**2).sum()) - sigma**2) < 1e-9


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_close_to_pil(photo, sigma):
    """PIL rounds after each of its six passes; edges are extended per pass: < 1 level on average."""
    ours = gpu.gaussian_blur(levels(photo), one(sigma))
    d = diff(ours, photo.filter(ImageFilter.GaussianBlur(radius=sigma)))
    assert d.mean() < 1.0 and torch.quantile(d.flatten(), 0.99) <= 3, (d.mean(), d.max())


# --- against independent formulas (float64, one pixel or one view at a time) -----------------


def test_hue_equals_colorsys_rotation():
    """``colorsys`` HSV, hue shifted by ``int(f * 255) / 255`` turns, back to RGB, rounded: equal
    up to a level where float32 meets a .5 boundary, on every sort of pixel (ties, greys)."""
    import colorsys

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (4, 3, 12, 12), generator=g).float()
    x[:, 1, :3] = x[:, 0, :3]  # R == G ties
    x[:, :, 3:5] = x[:, :1, 3:5]  # greys
    factors = torch.tensor([-0.1, -0.0371, 0.0025, 0.0999], dtype=torch.float64)
    ours = gpu.adjust_hue(x.clone(), factors)
    for i, f in enumerate(factors.tolist()):
        turn = int(f * 255) / 255
        pixels = x[i].permute(1, 2, 0).reshape(-1, 3).tolist()
        hsv = [colorsys.rgb_to_hsv(*(c / 255 for c in p)) for p in pixels]
        want = [[round(c * 255) for c in colorsys.hsv_to_rgb((h + turn) % 1.0, s, v)] for h, s, v in hsv]
        got = ours[i].permute(1, 2, 0).reshape(-1, 3)
        d = (got - torch.tensor(want, dtype=torch.float32)).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 0.01, (f, d.max())


def reference_blur(view: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2-d convolution of one ``[C, H, W]`` view with the separable PIL kernel, edges
    extended, float64."""
    k = gpu.pil_blur_kernel(sigma).numpy()
    half = len(k) // 2
    padded = np.pad(view, ((0, 0), (half, half), (half, half)), mode="edge")
    h, w = view.shape[1:]
    out = np.zeros(view.shape)
    for i, ki in enumerate(k):
        for j, kj in enumerate(k):
            out += ki * kj * padded[:, i : i + h, j : j + w]
    return np.round(out)


def test_blur_of_views_with_kernels_of_different_lengths():
    """Short (sigma < 1.41) and long kernels in one batch, and views left alone (sigma 0)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (5, 3, 10, 13), generator=g).float()
    sigmas = [0.3, 1.9, 0.0, 1.2, 1.5]
    out = gpu._blur_where(x.clone(), sigmas)
    for i, s in enumerate(sigmas):
        want = reference_blur(x[i].double().numpy(), s) if s > 0 else x[i].numpy()
        d = np.abs(out[i].numpy() - want)
        assert d.max() <= 1 and (d > 0).mean() < 0.01, (s, d.max())
    torch.testing.assert_close(out[[0, 3, 4]], gpu.gaussian_blur(x[[0, 3, 4]], torch.tensor([0.3, 1.2, 1.5])))


def test_solarize_is_its_definition():
    x = torch.arange(256.0).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    want = torch.where(x >= 128, 255 - x, x)
    assert torch.equal(gpu.solarize(x), want)


# --- batching with per-view parameters ---------------------------------------------------------


def random_params(n: int, seed: int) -> list[ViewParams]:
    aug = dinocli.create_augmentation(
        "dino", global_crop_size=24, local_crop_size=24, local_crops_number=n - 2, blur_sigma=(0.1, 2.0)
    )  # the reference's blur sigmas, whatever the crop size, to cover the whole range
    return aug.sample(48, 64, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [2, 7, 12])
def test_batched_views_equal_views_processed_alone(n):
    """Whatever the runs of views an operation selects (slices or a gathered copy), each view gets
    exactly its own parameters."""
    images = [levels(make_rgb_image(24, 24, seed=s)) for s in range(n)]
    for seed in range(4):
        params = random_params(n, seed)
        batch = gpu.colour_views(torch.cat(images), ColourParams.from_views(params))
        for i, p in enumerate(params):
            alone = gpu.colour_views(images[i].clone(), ColourParams.from_views([p]))
            torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-3)


def one_by_one(view: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """One view ``[1, 3, H, W]`` through the public single operations, in the view's order."""
    f = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    if p.jitter is not None:
        ops = (gpu.adjust_brightness, gpu.adjust_contrast, gpu.adjust_saturation, gpu.adjust_hue)
        factors = (p.jitter.brightness, p.jitter.contrast, p.jitter.saturation, p.jitter.hue)
        for k in p.jitter.order:
            view = ops[k](view, f(factors[k]))
    if p.grayscale:
        view = gpu.to_grayscale(view)
    if p.blur_sigma is not None:
        view = gpu.gaussian_blur(view, f(p.blur_sigma))
    return gpu.solarize(view) if p.solarize else view


@pytest.mark.parametrize("n", [3, 10, 16])
def test_sorted_seven_step_jitter_equals_each_view_one_operation_at_a_time(n):
    """Views sorted by where their hue falls, brightness/contrast/saturation of different views in
    one blend: bit for bit the single operations applied view by view (hue at every position of
    the order, and every operation, over the seeds)."""
    images = [levels(make_rgb_image(20, 16, seed=s)) for s in range(n)]
    hue_at, seen = set(), set()
    for seed in range(8):
        params = random_params(n, seed)
        hue_at.update(p.jitter.order.index(3) for p in params if p.jitter)
        seen.update(f for p in params for f in ("grayscale", "blur_sigma", "solarize") if getattr(p, f))
        batch = gpu.colour_views(torch.cat(images).to(torch.uint8), ColourParams.from_views(params))
        for i, p in enumerate(params):
            assert torch.equal(batch[i : i + 1], one_by_one(images[i].clone(), p)), (seed, i, p)
    assert hue_at == {0, 1, 2, 3} and seen == {"grayscale", "blur_sigma", "solarize"}


def test_colour_views_sorted_gives_the_order_and_takes_view_params():
    params = random_params(9, 5)
    x = torch.cat([levels(make_rgb_image(12, 12, seed=s)) for s in range(9)])
    want = gpu.colour_views(x.clone(), ColourParams.from_views(params))
    got, views = gpu.colour_views_sorted(x.clone(), params)  # ViewParams directly
    assert sorted(views) == list(range(9)) and views != list(range(9))
    assert torch.equal(got, want[views])


def test_mixed_jitter_pass_equals_each_operation():
    x = torch.cat([levels(make_rgb_image(16, 12, seed=s)) for s in range(6)])
    kinds, factors = [0, 2, 1, 1, 2, 0], torch.tensor([1.3, 0.8, 0.6, 1.4, 1.2, 0.7], dtype=torch.float64)
    out = gpu.adjust_jitter_(x.clone(), kinds, factors)
    single = (gpu.adjust_brightness, gpu.adjust_contrast, gpu.adjust_saturation)
    for i, k in enumerate(kinds):
        assert torch.equal(out[i : i + 1], single[k](x[i : i + 1], factors[i : i + 1]))
    two = gpu.adjust_jitter_(x[:2].clone(), [1, 0], factors[:2])
    assert torch.equal(two[1:], gpu.adjust_brightness(x[1:2], factors[1:2]))
    with pytest.raises(ValueError, match="hue"):
        gpu.adjust_jitter_(x.clone(), [3, 0, 0, 0, 0, 0], factors)


def test_jitter_steps_put_every_hue_on_step_three_and_keep_each_order():
    jitter, orders = [True, True, False, True], [[3, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [2, 3, 0, 1]]
    steps = gpu._jitter_steps(jitter, orders)
    assert steps[2].tolist() == [-1] * gpu.JITTER_STEPS
    for row, order, on in zip(steps, orders, jitter):
        if on:
            assert row[3] == 3 and [k for k in row.tolist() if k >= 0] == order


def test_public_operations_leave_their_input_alone(photo):
    x = levels(photo)
    before = x.clone()
    f = one(1.3)
    for op in (gpu.adjust_brightness, gpu.adjust_contrast, gpu.adjust_saturation, gpu.gaussian_blur):
        op(x, f)
    gpu.adjust_hue(x, one(0.05))
    gpu.to_grayscale(x), gpu.solarize(x)
    assert torch.equal(x, before)


def reference_colour(image: Image.Image, p: ViewParams) -> Image.Image:
    """The reference's colour steps with torchvision's PIL functions, in order."""
    if p.jitter is not None:
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = (p.jitter.brightness, p.jitter.contrast, p.jitter.saturation, p.jitter.hue)
        for k in p.jitter.order:
            image = fns[k](image, factors[k])
    if p.grayscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if p.blur_sigma is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        image = ImageOps.solarize(image)
    return image


def test_whole_colour_pipeline_close_to_the_reference():
    """Sampled parameters (every op, every order): mean difference per view under 1.5 levels."""
    image = make_rgb_image(32, 32, seed=7)
    means, seen = [], set()
    for seed in range(25):
        params = random_params(6, seed)
        out = gpu.colour_views(torch.cat([levels(image)] * 6), ColourParams.from_views(params))
        for i, p in enumerate(params):
            d = diff(out[i : i + 1], reference_colour(image, p))
            means.append(float(d.mean()))
            seen.update(f for f in ("jitter", "grayscale", "blur_sigma", "solarize") if getattr(p, f))
    assert seen == {"jitter", "grayscale", "blur_sigma", "solarize"}
    assert max(means) < 1.5 and np.mean(means) < 0.6, (max(means), np.mean(means))


def test_jitter_order_matters_and_is_followed(photo):
    """Brightness 1.4 then contrast 0.6 differs from the other order (clipping): each order is PIL's."""
    x = levels(photo)
    for order in ((0, 1, 2, 3), (1, 0, 2, 3)):
        p = ViewParams(0, 0, 48, 64, False, ColorJitterParams(order, 1.4, 0.6, 1.0, 0.0), False, None, False)
        out = gpu.colour_views(x.clone(), ColourParams.from_views([p]))
        expected = reference_colour(photo, p)
        assert diff(out, expected).max() <= 6  # PIL's HSV round trip for hue 0 costs a few levels
    a = gpu.colour_views(x.clone(), ColourParams.from_views([p]))
    p0 = ViewParams(0, 0, 48, 64, False, ColorJitterParams((0, 1, 2, 3), 1.4, 0.6, 1.0, 0.0), False, None, False)
    b = gpu.colour_views(x.clone(), ColourParams.from_views([p0]))
    assert (a - b).abs().mean() > 1


def test_normalize_is_totensor_then_normalize(photo):
    x = levels(photo)
    expected = TF.normalize(TF.to_tensor(photo), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(gpu.normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[0], expected)


def test_wrong_number_of_parameters_is_refused():
    with pytest.raises(ValueError, match="3 colour parameters for 2 views"):
        gpu.colour_views(torch.zeros(2, 3, 4, 4), ColourParams.from_views(random_params(3, 0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_on_cuda_equals_cpu():
    params = random_params(8, 3)
    x = torch.cat([levels(make_rgb_image(24, 24, seed=s)) for s in range(8)])
    cpu = gpu.colour_views(x.clone(), ColourParams.from_views(params))
    cuda = gpu.colour_views(x.cuda(), ColourParams.from_views(params)).cpu()
    # float rounding may flip a level where a value sits on .5
    assert (cpu - cuda).abs().max() <= 1 and (cpu != cuda).float().mean() < 0.01
