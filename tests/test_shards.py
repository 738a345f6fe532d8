"""Tar shards as --data: patterns, the index, the writer, extraction and training equal to a folder.

Every tar file is made here, from generated images (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinocli.data import find_images, image_folder, list_images, list_labelled_images, write_shards
from dinocli.data.multicrop_dataset import BadImageError, MultiCropDataset, collate_multicrop
from dinocli.data.shards import ShardMember, expand_braces, index_shard, shard_paths
from dinocli.errors import UsageError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Shard indexes are cached under the test's own folder, not ~/.cache."""
    monkeypatch.setenv("DINOCLI_CACHE", str(tmp_path / "cache"))


def _image(seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """An ImageFolder tree of 9 images: JPEG, PNG, grayscale, a stem with a dot."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog", "emu")):
        (root / name).mkdir(parents=True)
        _image(3 * c).save(root / name / "a.jpg", quality=90)
        _image(3 * c + 1).save(root / name / "b.png")
        _image(3 * c + 2).convert("L").save(root / name / "c.v2.jpg")
    return root


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, format="JPEG")
    return buf.getvalue()


# -- naming shards ------------------------------------------------------------------------------


def test_brace_expansion():
    assert expand_braces("s-{000000..000002}.tar") == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/s-{09..10}.tar") == ["a/s-09.tar", "a/s-10.tar", "b/s-09.tar", "b/s-10.tar"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("s-{1..}.tar", "s-{0..2.tar", "s-{a{1,2}}.tar", "s-{x}.tar", "s-{0..99999999}.tar"):
        with pytest.raises(UsageError):
            expand_braces(bad)


def test_every_way_of_naming_shards_gives_the_same_list(folder, tmp_path):
    shards = write_shards(folder, str(tmp_path / "out" / "s-%06d.tar"), max_count=4)
    assert [p.name for p in shards] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    out = tmp_path / "out"
    forms = [
        str(out / "s-{000000..000002}.tar"),
        out,
        "::".join(str(p) for p in shards),
        [str(p) for p in shards],
    ]
    for form in forms:
        assert shard_paths(form) == shards, form
    assert shard_paths(shards[1]) == [shards[1]]
    # Folders of images, 'demo' and a missing folder are not shards.
    assert shard_paths(folder) is None and shard_paths("demo") is None and shard_paths(tmp_path / "nope") is None


def test_clear_errors_for_bad_shard_names_and_files(folder, tmp_path):
    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=5)
    with pytest.raises(UsageError, match=r"shard not found: .*s-2\.tar \(from .*s-\{0\.\.2\}\.tar\)"):
        shard_paths(str(tmp_path / "s-{0..2}.tar"))
    with pytest.raises(UsageError, match="shard not found"):
        shard_paths(str(tmp_path / "missing.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(UsageError, match="junk.tar is not an uncompressed tar file"):
        list_images(tmp_path / "junk.tar")
    gz = tmp_path / "packed.tar"
    gz.write_bytes(gzip.compress((tmp_path / "s-0.tar").read_bytes()))
    with pytest.raises(UsageError, match="packed.tar is not an uncompressed tar file"):
        list_images(gz)
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "s-0.tar").read_bytes()[:3000])
    with pytest.raises(UsageError, match="cut.tar"):
        list_images(cut)
    _tar(tmp_path / "text.tar", [("notes.txt", b"hello")])
    with pytest.raises(UsageError, match="no images found in .*text.tar"):
        list_images(tmp_path / "text.tar")
    with pytest.raises(UsageError, match="is not a folder of shards"):
        shard_paths([str(folder)])


# -- the index and the writer -------------------------------------------------------------------


def test_shards_hold_the_folder_images_in_order(folder, tmp_path):
    shards = write_shards(folder, str(tmp_path / "s-%03d.tar"), max_count=4)
    members, labels, classes = list_labelled_images(str(tmp_path / "s-{000..002}.tar"))
    files, folder_labels, folder_classes = image_folder(folder)
    assert [m.read_bytes() for m in members] == [f.read_bytes() for f in files]
    assert (labels, classes) == (folder_labels, folder_classes)
    rel = [f.relative_to(folder).as_posix() for f in files]
    assert [m.name for m in members] == [r.replace("c.v2", "c_v2") for r in rel]  # the key ends at a dot
    assert [Path(m.shard).name for m in members] == ["s-000.tar"] * 4 + ["s-001.tar"] * 4 + ["s-002.tar"]
    assert str(members[0]) == f"{shards[0]}:cat/a.jpg"
    # The same folder gives the same bytes.
    again = write_shards(folder, str(tmp_path / "again-%03d.tar"), max_count=4)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]


def test_the_index_is_cached_until_the_shard_changes(folder, tmp_path):
    shard = write_shards(folder, str(tmp_path / "s-%d.tar"))[0]
    fresh = index_shard(shard, cache=False)
    assert not (tmp_path / "cache").exists()
    assert index_shard(shard) == fresh
    (saved,) = (tmp_path / "cache" / "shard-index").glob("*.json")
    # The next index comes from the cache file (here altered to prove it) ...
    text = saved.read_text()
    saved.write_text(text.replace('"cat/a.jpg"', '"cat/z.jpg"'))
    assert index_shard(shard)[0].image.name == "cat/z.jpg"
    # ... until the shard changes: then the headers are read again.
    _tar(shard, [("new/1.jpg", _jpeg(0))])
    assert [s.image.name for s in index_shard(shard)] == ["new/1.jpg"]
    saved.write_text("{not json")
    assert [s.image.name for s in index_shard(shard)] == ["new/1.jpg"]


def test_writer_refuses_two_images_with_one_key(tmp_path):
    (tmp_path / "d").mkdir()
    _image(0).save(tmp_path / "d" / "x.png")
    _image(1).save(tmp_path / "d" / "x.jpg")
    with pytest.raises(UsageError, match="share the shard key 'x'"):
        write_shards(tmp_path / "d", str(tmp_path / "s-%d.tar"))
    with pytest.raises(UsageError, match="needs one number field"):
        write_shards(tmp_path / "d", str(tmp_path / "s.tar"))


def test_webdataset_samples_and_cls_labels(tmp_path):
    jpg = [_jpeg(i) for i in range(4)]
    shard = _tar(tmp_path / "wds.tar", [
        ("k0.jpg", jpg[0]), ("k0.cls", b"3"), ("k0.seg.png", b"a mask, not the image"),
        ("k1.json", b"{}"), ("k1.cls", b"1"),                     # no image: left out
        ("k2.JPEG", jpg[1]), ("k2.cls", b" 0\n"),
        (".hidden.jpg", jpg[2]), ("sub/.x.jpg", jpg[2]),         # hidden: left out
        ("k3.cls", b"2"), ("k3.png", jpg[3]),                     # the label may come first
    ])  # fmt: skip
    samples = index_shard(shard)
    assert [(s.key, s.image.name, s.cls) for s in samples] == [
        ("k0", "k0.jpg", 3), ("k2", "k2.JPEG", 0), ("k3", "k3.png", 2)
    ]
    assert samples[1].image.read_bytes() == jpg[1]
    members, labels, classes = list_labelled_images(shard)
    assert labels == [3, 0, 2] and classes == ["0", "1", "2", "3"]
    # Without .cls on every sample: the key's parent folder, else unlabelled.
    nested = _tar(tmp_path / "nested.tar", [("x/y/cat/1.jpg", jpg[0]), ("x/y/dog/2.jpg", jpg[1]), ("x/cat/3.jpg", jpg[2])])
    assert list_labelled_images(nested)[1:] == ([0, 1, 0], ["cat", "dog"])
    flat = _tar(tmp_path / "flat.tar", [("1.jpg", jpg[0]), ("a/2.jpg", jpg[1])])
    assert list_labelled_images(flat)[1:] == ([-1, -1], [])
    bad = _tar(tmp_path / "badcls.tar", [("k.jpg", jpg[0]), ("k.cls", b"cat")])
    with pytest.raises(UsageError, match=r"badcls.tar:k.cls is not an integer class label"):
        index_shard(bad)


# -- training data: identical to the folder -----------------------------------------------------


def _augmentation():
    from dinocli import create_augmentation

    return create_augmentation("dino", global_crop_size=32, local_crop_size=16, local_crops_number=2)


def test_training_items_are_identical_to_the_folder(folder, tmp_path):
    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=4)
    files, members = find_images(folder), list_images(str(tmp_path / "s-{0..2}.tar"))
    aug = _augmentation()
    for on_device in (False, True):
        a = MultiCropDataset(files, aug, seed=3, on_device=on_device)
        b = MultiCropDataset(members, aug, seed=3, on_device=on_device)
        for epoch in (0, 1):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            x = collate_multicrop([a[i] for i in range(len(a))]).crops
            y = collate_multicrop([b[i] for i in range(len(b))]).crops
            if on_device:
                x, y = x.finish("cpu"), y.finish("cpu")
            assert len(x) == len(y) == 4
            for u, v in zip(x, y):
                assert torch.equal(u, v)


def test_bad_images_in_shards_are_skipped_or_named(tmp_path):
    members = [("good.jpg", _jpeg(0)), ("broken.jpg", _jpeg(1)[:200]), ("junk.png", b"x" * 50)]
    shard = _tar(tmp_path / "mixed.tar", members)
    members = list_images(shard)
    for on_device in (False, True):
        ds = MultiCropDataset(members, _augmentation(), on_device=on_device)
        assert ds[0] is not None and ds[2] is None
        failing = MultiCropDataset(members, _augmentation(), on_bad_image="fail", on_device=on_device)
        with pytest.raises(BadImageError, match=r"cannot decode image .*mixed\.tar:junk\.png"):
            failing[2]
    with pytest.raises(BadImageError, match=r"cannot decode image .*mixed\.tar:broken\.jpg"):
        MultiCropDataset(members, _augmentation(), on_bad_image="fail")[1]


def test_processes_split_shard_samples_without_duplicates(folder, tmp_path):
    from dinocli.train.sampler import EpochSampler

    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=2)
    members = list_images(tmp_path)
    seen = []
    for rank in range(3):
        sampler = EpochSampler(len(members), batch_size=1, seed=0, rank=rank, world_size=3)
        seen += [members[i] for i in sampler]
    assert len(seen) == len(set(seen)) == 9


# -- extraction and pretraining -----------------------------------------------------------------


def _vit():
    from dinocli.evaluate.extract import backbone_for_eval

    return backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=8, img_size=32, depth=2)[0]


def test_extract_from_shards_equals_extract_from_the_folder(folder, tmp_path):
    from dinocli.evaluate import extract_folder

    write_shards(folder, str(tmp_path / "out" / "s-%d.tar"), max_count=4)
    model = _vit()
    options = dict(resize=32, crop_size=32, batch_size=4, num_workers=0, precision="fp32", device="cpu")
    a = extract_folder(model, folder, **options)
    b = extract_folder(model, tmp_path / "out", **options)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert a.classes == b.classes == ["cat", "dog", "emu"]
    assert [p.replace("c.v2", "c_v2") for p in a.paths] == b.paths
    # Decoding on the device (workers send the members' bytes): the same as from the folder too.
    c = extract_folder(model, folder, decode_on_device=True, **options)
    d = extract_folder(model, tmp_path / "out", decode_on_device=True, **options)
    assert torch.equal(c.features, d.features)


def test_extract_cli_reads_shards_and_names_a_bad_member(tmp_path, cli):
    from dinocli.cli import app
    from dinocli.evaluate.features_io import load_features

    shard = _tar(tmp_path / "s-0.tar", [("cat/1.jpg", _jpeg(0)), ("dog/2.jpg", _jpeg(1))])
    common = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--depth", "1", "--resize", "32",
              "--crop-size", "32", "--num-workers", "0", "--device", "cpu"]
    done = cli.invoke(app, ["extract", "--data", str(tmp_path / "s-{0..0}.tar"), "-o", str(tmp_path / "f.st"), *common])
    assert done.exit_code == 0, done.output
    feats = load_features(tmp_path / "f.st")
    assert feats.classes == ["cat", "dog"] and feats.paths == ["cat/1.jpg", "dog/2.jpg"]
    _tar(shard, [("cat/1.jpg", _jpeg(0)), ("dog/2.jpg", b"not a jpeg")])
    done = cli.invoke(app, ["extract", "--data", str(shard), "-o", str(tmp_path / "g.safetensors"), *common])
    assert done.exit_code == 2 and f"cannot read image {shard}:dog/2.jpg" in done.output
    done = cli.invoke(app, ["extract", "--data", str(tmp_path / "s-{0..1}.tar"), "-o", str(tmp_path / "h.st"), *common])
    assert done.exit_code == 2 and "shard not found" in done.output


def test_pretraining_on_shards_equals_the_folder_and_resumes_exactly(folder, tmp_path):
    from dinocli.distributed import ProcessGroup
    from dinocli.train import resolve_config
    from dinocli.train.loop import Trainer, pretrain

    tiny = dict(arch="vit_tiny", patch_size=8, depth=1, out_dim=32, global_crop_size=32, local_crop_size=16,
                local_crops_number=1, batch_size=4, warmup_epochs=1, num_workers=0, precision="fp32",
                progress=False, saveckp_freq=1, epochs=2)
    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=4)

    def config(data, out):
        return resolve_config(overrides={**tiny, "data": str(data), "output": str(tmp_path / out)})

    straight = pretrain(config(folder, "folder"))
    trainer = Trainer(config(tmp_path / "s-{0..2}.tar", "shards"), ProcessGroup(), torch.device("cpu"), "fp32",
                      display_rich=False)
    try:
        trainer.run(stop_after_epoch=1)
    finally:
        trainer.close()
    resumed = pretrain(config(tmp_path / "s-{0..2}.tar", "shards"))
    assert (straight.iterations, resumed.iterations) == (4, 4)
    a = torch.load(tmp_path / "folder" / "checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(tmp_path / "shards" / "checkpoint.pth", weights_only=True)["teacher"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_shards_command_writes_what_it_says(folder, tmp_path, cli):
    from dinocli.cli import app

    done = cli.invoke(app, ["shards", "--data", str(folder), "--output", str(tmp_path / "s-%03d.tar"), "--max-count", "4"])
    assert done.exit_code == 0, done.output
    pattern = str(tmp_path / "s-{000..002}.tar")
    assert f"wrote 3 shard(s); read them with --data '{pattern}'" in done.output
    assert [m.read_bytes() for m in list_images(pattern)] == [p.read_bytes() for p in find_images(folder)]
    done = cli.invoke(app, ["shards", "--data", str(folder), "--output", str(tmp_path / "s.tar")])
    assert done.exit_code == 2 and "needs one number field" in done.output


def test_rewriting_into_fewer_shards_names_the_ones_an_earlier_run_left(folder, tmp_path, cli):
    from dinocli.cli import app

    out = tmp_path / "shards"
    args = ["shards", "--data", str(folder), "--output", str(out / "s-%03d.tar")]
    first = cli.invoke(app, [*args, "--max-count", "2"])  # 9 images: 5 shards
    assert first.exit_code == 0 and "warning" not in first.stderr, first.output
    again = cli.invoke(app, [*args, "--max-count", "4"])  # 3 shards: 003 and 004 are left over
    assert again.exit_code == 0, again.output
    assert again.stderr.strip().splitlines() == [
        f"warning: 2 older shard(s) of this pattern remain from an earlier run ({out / 's-003.tar'} ...); "
        "--data on their folder would read them too: delete them"
    ]
    assert len(list_images(str(out))) == 9 + 3  # the hazard: the folder also reads 003 (2 images) and 004 (1)
    (out / "s-003.tar").unlink()
    (out / "s-004.tar").unlink()
    assert [m.read_bytes() for m in list_images(str(out))] == [p.read_bytes() for p in find_images(folder)]


def test_benchmark_compares_folder_and_shards(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "shards.py"
    out = tmp_path / "shards.json"
    args = ["--generate", "24", "--per-shard", "10", "--rounds", "1", "--resize", "32", "--crop-size", "32",
            "--num-workers", "0", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["images"] == 24 and figures["shards"] == 3 and figures["identical_features"]
    assert figures["folder_images_per_s"] > 0 and figures["shards_images_per_s"] > 0
    assert "ratio shards / folder" in done.stdout and "machine:" in done.stdout


def test_knn_monitor_takes_shards(folder, tmp_path):
    from dinocli.train.knn_monitor import KnnMonitor

    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=5)
    monitor = KnnMonitor(str(tmp_path / "s-{0..1}.tar"), str(folder), every=1, crop_size=32, k=3)
    assert (monitor.n_train, monitor.n_val) == (9, 9)
    result = monitor.evaluate(_vit())
    assert 0 <= result["knn_top1"] <= 100


def test_auto_recipe_sizes_shards_as_their_folder(folder, tmp_path):
    from dinocli.recipes import describe_data
    from dinocli.train.config import recipe_values

    write_shards(folder, str(tmp_path / "s-%d.tar"), max_count=4)
    pattern = str(tmp_path / "s-{0..2}.tar")
    assert describe_data(pattern) == describe_data(folder)
    assert describe_data(pattern).n_images == 9
    assert recipe_values("auto", {"data": pattern}) == recipe_values("auto", {"data": str(folder)})
