"""The on-device data path (dinocli.augmentations.device, ``--augment-on gpu``, extraction on CUDA),
run on CPU tensors: the batched resize against ``F.interpolate``, each view against the CPU path
for the same random draws, the draws themselves, the fallbacks for other files and bad files, and
extraction against the PIL preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import dinocli
from dinocli.augmentations import device as D
from dinocli.augmentations.gpu import ColourParams
from dinocli.data.images import open_rgb
from dinocli.data.multicrop_dataset import BadImageError, MultiCropDataset, collate_multicrop
from dinocli.errors import UsageError
from dinocli.evaluate.extract import IMAGENET_MEAN, IMAGENET_STD

from conftest import make_rgb_image

STD_LEVELS = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def small_aug():
    return dinocli.create_augmentation("dino", global_crop_size=32, local_crop_size=16, local_crops_number=3)


@pytest.fixture
def files(tmp_path):
    """Four JPEGs of different sizes, one PNG and one grey JPEG."""
    paths = []
    for i, (w, h) in enumerate([(90, 70), (64, 80), (100, 60), (72, 72)]):
        paths.append(tmp_path / f"{i}.jpg")
        make_rgb_image(w, h, seed=i).save(paths[-1], quality=90)
    paths.append(tmp_path / "4.png")
    make_rgb_image(50, 66, seed=9).save(paths[-1])
    paths.append(tmp_path / "5.jpg")
    make_rgb_image(80, 64, seed=5).convert("L").save(paths[-1])
    return paths


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("box", [(3, 5, 40, 33, 24), (0, 0, 50, 70, 20), (10, 20, 12, 9, 32), (2, 4, 24, 24, 24)])
def test_resize_weights_are_torch_antialiased_interpolation(box, interpolation):
    top, left, h, w, size = box
    image = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(0)) * 255
    crop = image[:, :, top : top + h, left : left + w]
    want = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    one, t = torch.tensor([size]), torch.tensor

    def weights(start, length, padded, **kw):
        return D.resize_weights(t([start]), t([length]), one, padded, size, interpolation=interpolation, **kw)

    rows, cols, flipped = weights(top, h, 50), weights(left, w, 70), weights(left, w, 70, flip=t([True]))
    torch.testing.assert_close(rows[0] @ image[0] @ cols[0].T, want[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(rows[0] @ image[0] @ flipped[0].T, want[0].flip(-1), rtol=0, atol=2e-3)
    assert torch.allclose(rows.sum(-1), torch.ones(1, size)) and (rows[0, :, :top] == 0).all()


def test_resample_rounds_to_levels_and_keeps_views_apart():
    images = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 30, 40], [5, 6, 10, 12], [1, 2, 20, 20], [0, 10, 30, 30]])
    size = torch.full((4,), 16)
    rows = D.resize_weights(boxes[:, 0], boxes[:, 2], size, 30, 16).view(2, 2, 16, 30)
    cols = D.resize_weights(boxes[:, 1], boxes[:, 3], size, 40, 16).view(2, 2, 16, 40)
    out = D.resample(images, rows, cols)
    assert out.shape == (2, 2, 3, 16, 16) and (out == out.round()).all()
    assert out.min() >= 0 and out.max() <= 255
    for b in range(2):
        for v in range(2):
            t, l, h, w = boxes[2 * b + v].tolist()
            crop = images[b : b + 1, :, t : t + h, l : l + w].float()
            want = F.interpolate(crop, size=(16, 16), mode="bicubic", antialias=True).round().clamp(0, 255)
            assert (out[b, v] - want[0]).abs().max() <= 1  # a value on .5 may round either way


def test_items_carry_the_cpu_paths_draws(files):
    aug = small_aug()
    on_device = MultiCropDataset(files, aug, seed=7, on_device=True)
    on_cpu = MultiCropDataset(files, aug, seed=7)
    for i, path in enumerate(files):
        item = on_device[i]
        with Image.open(path) as opened:
            params = aug.plan(opened.size, on_cpu.generator(i))
        assert torch.equal(item.boxes, D.view_boxes(params))
        want = ColourParams.from_views(params)
        for field in ColourParams.__dataclass_fields__:
            assert torch.equal(getattr(item.colour, field), getattr(want, field))
        assert item.sizes == (32, 32, 16, 16, 16) and item.path == str(path)
    assert on_device[0].data.dim() == 1  # JPEG: the file's bytes
    assert on_device[0].data.numel() == files[0].stat().st_size
    assert on_device[4].data.shape == (3, 66, 50)  # PNG: decoded by the worker


def test_views_equal_the_cpu_path_for_the_same_draws(files):
    """Within rounding: the crops differ by at most one level (fixed-point weights on the CPU),
    which the colour operations (contrast up to 1.4x, blur) may widen to a few levels on ~1 % of
    pixels."""
    aug = small_aug()
    dataset = MultiCropDataset(files, aug, seed=3, on_device=True)
    batch = collate_multicrop([dataset[i] for i in range(len(files))]).crops
    got = batch.finish("cpu")
    want = []
    for i, path in enumerate(files):
        image = open_rgb(path)
        params = aug.sample(image.height, image.width, dataset.generator(i))
        want.append(aug.colour(aug.crops(image, params), params))
    for g, w in zip(got, [torch.stack(v) for v in zip(*want)]):
        assert g.shape == w.shape and g.dtype == torch.float32
        levels = ((g - w) * STD_LEVELS).abs()
        assert levels.mean() < 0.4 and (levels > 2.5).float().mean() < 0.03


def test_crops_before_colour_within_one_level(files):
    aug = small_aug()
    image = open_rgb(files[0])
    params = aug.sample(image.height, image.width, torch.Generator().manual_seed(1))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    boxes = D.view_boxes(params)
    for v, (cpu, spec) in enumerate(zip(aug.crops(image, params), aug.specs)):
        b, s = boxes[v : v + 1], torch.tensor([spec.size])
        rows = D.resize_weights(b[:, 0], b[:, 2], s, pixels.shape[2], spec.size)
        cols = D.resize_weights(b[:, 1], b[:, 3], s, pixels.shape[3], spec.size, flip=b[:, 4].bool())
        ours = D.resample(pixels, rows[None], cols[None])[0, 0]
        assert (ours - cpu.float()).abs().max() <= 1


def test_bad_bytes_are_skipped_or_named(files, tmp_path):
    bad = tmp_path / "bad.jpg"
    data = files[0].read_bytes()
    bad.write_bytes(data[:600] + bytes(len(data) - 600))  # a valid header, zeros after it
    aug = small_aug()
    items = [MultiCropDataset([bad, files[1]], aug, on_device=True)[i] for i in range(2)]
    batch = collate_multicrop(items).crops
    views = batch.finish("cpu")
    assert batch.n_dropped == 1 and [v.shape[0] for v in views] == [1] * 5
    failing = collate_multicrop([MultiCropDataset([bad], aug, on_device=True, on_bad_image="fail")[0]]).crops
    with pytest.raises(BadImageError, match="bad.jpg"):
        failing.finish("cpu")


def test_on_device_needs_an_augmentation_with_a_plan(tmp_path):
    class Plain:
        n_global, n_local = 2, 0

        def __call__(self, image, generator):
            return []

    make_rgb_image().save(tmp_path / "a.png")
    with pytest.raises(UsageError, match="cannot run on the device"):
        MultiCropDataset([tmp_path / "a.png"], Plain(), on_device=True)


def test_eval_views_equal_resize_centre_crop(files):
    reference = transforms.Compose([
        transforms.Resize(40, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    with Image.open(files[0]) as a, Image.open(files[4]) as b:
        items = [D.read_for_device(files[0].read_bytes(), a), D.read_for_device(files[4].read_bytes(), b)]
    got = D.eval_views(items, 40, 32, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    want = torch.stack([reference(open_rgb(files[0])), reference(open_rgb(files[4]))])
    levels = ((got - want) * STD_LEVELS).abs()  # PIL rounds to 8 bits between its two passes
    assert got.shape == (2, 3, 32, 32) and levels.max() <= 4 and levels.mean() < 0.3


def test_extract_decoding_on_the_device_gives_the_same_features(files):
    from dinocli import create_backbone
    from dinocli.evaluate.extract import extract_features

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", patch_size=16)
    options = dict(resize=40, crop_size=32, batch_size=4)
    cpu = extract_features(model, files, **options)
    dev = extract_features(model, files, decode_on_device=True, **options)
    assert F.cosine_similarity(cpu.features, dev.features).min() > 0.999
    with pytest.raises(UsageError, match="bicubic or bilinear"):
        extract_features(model, files, decode_on_device=True, interpolation="nearest", **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_on_cuda_equals_cpu(files):
    aug = small_aug()
    dataset = MultiCropDataset(files, aug, seed=3, on_device=True)
    items = [dataset[i] for i in range(len(files))]
    cpu = collate_multicrop(items).crops.finish("cpu")
    cuda = collate_multicrop(items).crops.finish("cuda")
    for a, b in zip(cpu, cuda):
        levels = ((a - b.cpu()) * STD_LEVELS).abs()  # nvJPEG's IDCT differs from libjpeg-turbo's
        assert levels.mean() < 1.0
