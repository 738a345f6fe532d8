"""MultiCropDataset: per-(seed, epoch, index) randomness, worker independence, bad images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import dinocli
from dinocli.data import find_images, open_rgb
from dinocli.data.multicrop_dataset import BadImageError, MultiCropBatch, MultiCropDataset, collate_multicrop, sample_seed
from dinocli.errors import UsageError

from conftest import make_rgb_image


@pytest.fixture
def aug():
    return dinocli.create_augmentation("dino", global_crop_size=16, local_crop_size=8, local_crops_number=2)


@pytest.fixture
def paths(tmp_path):
    out = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        make_rgb_image(40, 32, seed=i).save(path)
        out.append(path)
    return out


def batches(loader):
    return [[v.clone() for v in b.crops] for b in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b)
    )


def test_item_uses_a_generator_seeded_from_seed_epoch_index(paths, aug):
    ds = MultiCropDataset(paths, aug, seed=5)
    ds.set_epoch(3)
    expected = aug(open_rgb(paths[2]), torch.Generator().manual_seed(sample_seed(5, 3, 2)))
    assert all(torch.equal(a, b) for a, b in zip(ds[2], expected))
    assert len(ds) == 6 and ds.epoch == 3


def test_seed_mix_is_stable_and_distinct():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert sample_seed(-1, 0, 0) == sample_seed(2**64 - 1, 0, 0)  # any integer seed works


def test_epochs_and_seeds_change_the_crops(paths, aug):
    ds = MultiCropDataset(paths, aug, seed=0)
    first = ds[0]
    ds.set_epoch(1)
    assert not torch.equal(first[0], ds[0][0])
    ds.set_epoch(0)
    assert torch.equal(first[0], ds[0][0])
    assert not torch.equal(first[0], MultiCropDataset(paths, aug, seed=1)[0][0])


def test_collate_stacks_each_view(paths, aug):
    ds = MultiCropDataset(paths, aug)
    batch = collate_multicrop([ds[0], ds[1], ds[2]])
    assert isinstance(batch, MultiCropBatch) and batch.n_skipped == 0
    assert [tuple(v.shape) for v in batch.crops] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    assert torch.equal(batch.crops[3][1], ds[1][3])
    crops, n_skipped = collate_multicrop([None, None])
    assert crops == [] and n_skipped == 2


def test_results_do_not_depend_on_the_number_of_workers(paths, aug):
    ds = MultiCropDataset(paths, aug, seed=3)

    def run(workers: int):
        loader = DataLoader(
            ds, batch_size=4, num_workers=workers, collate_fn=collate_multicrop,
            persistent_workers=workers > 0,
        )  # fmt: skip
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
            out.append(batches(loader))
        return out

    in_process, two_workers = run(0), run(2)
    assert same(in_process[0], two_workers[0]) and same(in_process[1], two_workers[1])
    assert not same(in_process[0], in_process[1])


def test_bad_images_are_skipped_and_counted(paths, aug, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:100])
    ds = MultiCropDataset([paths[0], broken, paths[1], truncated], aug)
    assert ds[1] is None and ds[3] is None
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_multicrop)
    (batch,) = list(loader)
    assert batch.n_skipped == 2 and batch.crops[0].shape[0] == 2
    assert torch.equal(batch.crops[0][1], ds[2][0])


def test_bad_image_fails_with_one_line_naming_the_file(paths, aug, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    ds = MultiCropDataset([paths[0], broken], aug, on_bad_image="fail")
    with pytest.raises(BadImageError, match="cannot decode image .*broken.png"):
        ds[1]
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_multicrop)
    with pytest.raises(BadImageError) as info:
        list(loader)  # re-raised by the DataLoader from its worker
    message = str(info.value)
    assert message.startswith("cannot decode image") and "broken.png" in message and "\n" not in message
    assert info.value.exit_code == 1  # the CLI prints it as one line: "error: cannot decode image ..."


def test_bad_arguments(paths, aug):
    with pytest.raises(UsageError, match="on_bad_image must be 'skip' or 'fail'"):
        MultiCropDataset(paths, aug, on_bad_image="ignore")
    with pytest.raises(UsageError, match="has no images"):
        MultiCropDataset([], aug)
    with pytest.raises(UsageError, match="epoch must be >= 0"):
        MultiCropDataset(paths, aug).set_epoch(-1)


def test_works_on_the_demo_data_tree(tmp_path, aug):
    from dinocli.data.demo_set import demo_dataset

    root = demo_dataset(tmp_path, train_per_class=1, val_per_class=1)
    ds = MultiCropDataset(find_images(root / "train"), aug)
    batch = collate_multicrop([ds[i] for i in range(len(ds))])
    assert batch.crops[0].shape == (10, 3, 16, 16) and batch.n_skipped == 0


def test_levels_are_the_same_floats_from_a_quarter_of_the_bytes(paths, aug):
    """``levels=True`` (training on a GPU): workers send uint8 levels, the device normalises them
    to exactly the views a worker would have sent; through worker processes too."""
    from dinocli.data.multicrop_dataset import LevelBatch

    floats = MultiCropDataset(paths, aug, seed=2)
    levels = MultiCropDataset(paths, aug, seed=2, levels=True)
    item = levels[1]
    assert all(v.dtype == torch.uint8 for v in item.views)
    assert sum(v.nbytes for v in item.views) * 4 == sum(v.nbytes for v in floats[1])
    loader = DataLoader(levels, batch_size=3, num_workers=2, collate_fn=collate_multicrop)
    got = [b.crops for b in loader]
    assert all(isinstance(b, LevelBatch) and len(b) == 3 for b in got)
    want = batches(DataLoader(floats, batch_size=3, collate_fn=collate_multicrop))
    assert same([b.finish("cpu") for b in got], want)


def test_split_items_are_uncoloured_crops_that_the_device_colours_into_the_same_floats(paths, aug):
    """``colour_on_device=True`` (``--augment-on split``): workers send the cut, resized, flipped
    views with their colour parameters; finishing them gives exactly the views a worker would
    have coloured (here on the CPU, through worker processes)."""
    from dinocli.data.multicrop_dataset import LevelBatch

    floats = MultiCropDataset(paths, aug, seed=2)
    split = MultiCropDataset(paths, aug, seed=2, levels=True, colour_on_device=True)
    item = split[1]
    assert item.colour is not None and len(item.colour) == len(item.views) == 4
    generator = split.generator(1)
    image = open_rgb(paths[1])
    params = aug.sample(image.height, image.width, generator)
    assert all(torch.equal(v, c) for v, c in zip(item.views, aug.crops(image, params)))  # not coloured yet
    loader = DataLoader(split, batch_size=3, num_workers=2, collate_fn=collate_multicrop)
    got = [b.crops for b in loader]
    assert all(isinstance(b, LevelBatch) and b.colour.factors.shape == (3, 4, 4) for b in got)
    want = batches(DataLoader(floats, batch_size=3, collate_fn=collate_multicrop))
    assert same([b.finish("cpu") for b in got], want)


def test_split_needs_an_augmentation_with_colour_stages(paths):
    with pytest.raises(UsageError, match="cannot run on the device"):
        MultiCropDataset(paths, lambda image, generator: [image], colour_on_device=True)


def test_levels_only_for_augmentations_that_can_stop_before_normalising(paths, aug):
    class FloatsOnly:  # a plugin with a crop plan whose colour stage always normalises
        specs = aug.specs

        def __init__(self):
            self.mean, self.std = aug.mean, aug.std

        def plan(self, size, generator):
            return aug.plan(size, generator)

        def draft_factor(self, params):
            return 1

        def crops(self, image, params, scale=1.0):
            return aug.crops(image, params, scale)

        def colour(self, crops, params):
            return aug.colour(crops, params)

    ds = MultiCropDataset(paths, FloatsOnly(), seed=2, levels=True)
    assert not ds.levels and all(v.dtype == torch.float32 for v in ds[0])
    assert not MultiCropDataset(paths, aug, levels=True, on_device=True).levels
