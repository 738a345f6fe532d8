"""dino extract: reference preprocessing, feature recipes, the features file, errors; extract -> knn."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dinocli import UsageError, create_backbone
from dinocli.cli import app
from dinocli.evaluate import backbone_for_eval, extract_folder, knn_features, load_features, matched_eval_size
from dinocli.weights import BACKBONE_SPEC_KEY
from conftest import make_rgb_image

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10_sub"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@functools.lru_cache(maxsize=None)
def _tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("vit_tiny", patch_size=16, img_size=32).eval()


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A vit_tiny/16 for 32 px images, seeded (built once per seed: initialisation is slow)."""
    return copy.deepcopy(_tiny_vit(seed))


def export(model: torch.nn.Module, path: Path) -> Path:
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": 16, "img_size": 32}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), {BACKBONE_SPEC_KEY: json.dumps(spec)})
    return path


def image_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            make_rgb_image(*size, seed=seed).save(root / cls / f"{i}.png")
            seed += 1
    return root


def reference_preprocess(path: Path, resize: int, crop: int) -> torch.Tensor:
    """Shorter side to ``resize`` (bicubic, long side truncated), center crop, ImageNet normalisation."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


@pytest.mark.parametrize(("size", "resize", "crop"), [((32, 32), 32, 32), ((48, 40), 36, 32)])
def test_features_are_model_outputs_of_reference_preprocessing(tmp_path: Path, size, resize: int, crop: int) -> None:
    root = image_tree(tmp_path / "imgs", {"b": 2, "a": 3}, size=size)
    model = tiny_vit()
    feats = extract_folder(model, root, resize=resize, crop_size=crop, batch_size=2)
    assert feats.features.shape == (5, 192) and feats.features.dtype == torch.float32
    assert feats.classes == ["a", "b"] and feats.labels.tolist() == [0, 0, 0, 1, 1]
    assert feats.paths == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png"]
    with torch.no_grad():
        expected = model(torch.stack([reference_preprocess(root / p, resize, crop) for p in feats.paths]))
    rel = (feats.features - expected).norm(dim=1) / expected.norm(dim=1)
    assert rel.max() < 1e-4


def test_raw_pixels_are_the_preprocessed_crop(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2}, size=(48, 40))
    model, info = backbone_for_eval(raw_pixels=True)
    feats = extract_folder(model, root, resize=36, crop_size=32)
    want = torch.stack([reference_preprocess(root / p, 36, 32).flatten() for p in feats.paths])
    assert feats.features.shape == (2, 3 * 32 * 32) and info["backbone"]["name"] == "raw_pixels"
    torch.testing.assert_close(feats.features, want, rtol=1e-5, atol=1e-5)


def test_random_init_builds_the_trained_patch_embedding() -> None:
    model, info = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32, patch_embed="conv")
    assert model.patch_embed.kind == "conv" and not model.training
    assert info["backbone"] == {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 4, "patch_embed": "conv"}}
    same, _ = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32, patch_embed="conv")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), same(x), rtol=0, atol=0)  # seeded: the same network
    linear, _ = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32)
    assert linear.patch_embed.kind == "linear"
    shallow, info = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32, depth=6)
    assert len(shallow.blocks) == 6 and info["backbone"]["kwargs"]["depth"] == 6
    with pytest.raises(UsageError, match="--depth applies to --random-init"):
        backbone_for_eval("weights.pth", depth=6)


def test_last_blocks_and_mean_patch_token(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2, "b": 1})
    model = tiny_vit()
    common = dict(resize=40, crop_size=32)
    cls_only = extract_folder(model, root, **common).features
    four = extract_folder(model, root, n_last_blocks=4, **common).features
    pooled = extract_folder(model, root, n_last_blocks=2, avgpool_patch_tokens=True, **common).features
    assert four.shape == (3, 4 * 192) and pooled.shape == (3, 3 * 192)
    x = torch.stack([reference_preprocess(root / p, 40, 32) for p in ("a/0.png", "a/1.png", "b/0.png")])
    with torch.no_grad():  # walk the blocks by hand
        tokens, outs = model.prepare_tokens(x), []
        for blk in model.blocks:
            tokens = blk(tokens)
            outs.append(model.norm(tokens))
    want_four = torch.cat([o[:, 0] for o in outs[-4:]], dim=1)
    want_pooled = torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 1:].mean(1)], dim=1)
    torch.testing.assert_close(four, want_four, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(four[:, -192:], cls_only, rtol=1e-4, atol=1e-5)


def test_bf16_on_cpu_is_close_to_fp32_and_the_model_is_left_as_found(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 3})
    model = tiny_vit()
    model.train()
    seen: list[int] = []
    fp32 = extract_folder(model, root, resize=32, crop_size=32, batch_size=2, progress=seen.append)
    assert model.training and seen == [2, 1]
    bf16 = extract_folder(model, root, resize=32, crop_size=32, precision="bf16")
    assert bf16.metadata["precision"] == "bf16" and fp32.metadata["precision"] == "fp32"
    assert fp32.metadata["data"] == str(root.resolve())  # which images, so knn can tell a train/val pair
    assert torch.nn.functional.cosine_similarity(bf16.features, fp32.features).min() > 0.99
    assert not torch.equal(bf16.features, fp32.features)


def test_plain_folder_is_unlabelled(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    (root / "sub").mkdir(parents=True)
    make_rgb_image(seed=1).save(root / "x.png")
    make_rgb_image(seed=2).save(root / "sub" / "y.png")
    feats = extract_folder(tiny_vit(), root, resize=32, crop_size=32)
    assert feats.labels.tolist() == [-1, -1] and feats.classes == [] and not feats.labelled
    assert feats.paths == ["sub/y.png", "x.png"]


def test_cli_writes_a_complete_features_file(tmp_path: Path, cli) -> None:
    root = image_tree(tmp_path / "imgs", {"cat": 2, "dog": 2})
    weights = export(tiny_vit(seed=3), tmp_path / "backbone.safetensors")
    out = tmp_path / "out" / "feats.safetensors"
    result = cli.invoke(
        app,
        ["extract", "-w", str(weights), "-d", str(root), "-o", str(out), "--resize", "36", "--crop-size", "32",
         "--dtype", "fp16", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote 4 x 192 features (2 classes) to {out}" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == ["feats.safetensors"]  # no temporary left behind
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("features").dtype == torch.float16 and f.get_tensor("labels").dtype == torch.int64
        meta = f.metadata()
    assert json.loads(meta["classes"]) == ["cat", "dog"]
    assert json.loads(meta["paths"]) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    info = json.loads(meta["dinocli.features"])
    assert info["weights"] == "backbone.safetensors"
    assert info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["backbone"] == {"name": "vit_tiny", "kwargs": {"patch_size": 16, "img_size": 32}}
    assert info["preprocessing"]["resize"] == 36 and info["preprocessing"]["crop_size"] == 32
    assert info["preprocessing"]["interpolation"] == "bicubic" and info["precision"] == "fp32"
    assert meta["dinocli.version"]
    feats = load_features(out)
    direct = extract_folder(tiny_vit(seed=3), root, resize=36, crop_size=32).features
    torch.testing.assert_close(feats.features.float(), direct.half().float())


def test_features_of_the_same_weights_in_two_files_agree_and_of_other_weights_do_not(tmp_path: Path, cli) -> None:
    from dinocli.weights import state_dict_sha256

    root = image_tree(tmp_path / "imgs", {"cat": 3, "dog": 3})
    model = tiny_vit(seed=3)
    exported = export(model, tmp_path / "backbone.safetensors")
    plain = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), plain)  # the same tensors, another file format
    other = export(tiny_vit(seed=4), tmp_path / "other.safetensors")
    common = ["-d", str(root), "--resize", "36", "--crop-size", "32", "--num-workers", "0", "--precision", "fp32"]
    for weights, name in ((exported, "a"), (plain, "b"), (other, "c")):
        result = cli.invoke(app, ["extract", "-w", str(weights), "-o", str(tmp_path / f"{name}.safetensors"), *common])
        assert result.exit_code == 0, result.output
    a, b = load_features(tmp_path / "a.safetensors"), load_features(tmp_path / "b.safetensors")
    assert a.metadata["weights_sha256"] != b.metadata["weights_sha256"]  # two different files ...
    assert a.metadata["backbone_sha256"] == b.metadata["backbone_sha256"] == state_dict_sha256(model.state_dict())
    assert knn_features(a, b, k=3).num_val == 6  # ... of the same weights
    result = cli.invoke(app, ["knn", "--train", str(tmp_path / "a.safetensors"), "--val", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2
    assert "extracted differently (different backbone weights (sha256 " in result.stderr
    assert ": backbone.safetensors vs other.safetensors)); extract both with the same --weights" in result.stderr


def test_cli_reads_the_checkpoint_key_of_a_training_checkpoint(tmp_path: Path, cli) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2})
    teacher, student = tiny_vit(seed=4), tiny_vit(seed=5)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "epoch": 3,
        },
        ckpt,
    )
    out = tmp_path / "student.safetensors"
    args = ["extract", "-w", str(ckpt), "-d", str(root), "-o", str(out), "--resize", "32", "--crop-size", "32",
            "--checkpoint-key", "student", "--num-workers", "0", "--precision", "fp32"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    feats = load_features(out)
    torch.testing.assert_close(feats.features, extract_folder(student, root, resize=32, crop_size=32).features)
    assert not torch.allclose(feats.features, extract_folder(teacher, root, resize=32, crop_size=32).features)
    assert feats.metadata["checkpoint_key"] == "student" and feats.metadata["weights"] == "checkpoint.pth"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--data", "{missing}"], 2, "data folder not found"),
        (["--precision", "fp16", "--device", "cpu"], 2, "--precision fp16 needs a CUDA device"),
        (["--resize", "16"], 2, "--resize (16) must be at least --crop-size (32)"),
        (["--n-last-blocks", "13"], 2, "--n-last-blocks must be between 1 and the depth (the backbone has 12 blocks)"),
        (["--dtype", "int8"], 2, "--dtype must be fp32 or fp16"),
        (["--interpolation", "cubic"], 2, "unknown interpolation 'cubic'"),
        (["--no-weights"], 2, "give --weights (a checkpoint or exported backbone), or --random-init --arch NAME"),
        (["--weights", "{missing}"], 2, "weights file not found"),
        (["--corrupt"], 2, "cannot read image"),
        (["--raw-pixels"], 2, "--raw-pixels uses no network: drop --weights, --random-init and --arch"),
        (["--no-weights", "--random-init"], 2, "--random-init needs --arch (e.g. --arch vit_small)"),
        (["--patch-embed", "conv"], 2, "--patch-embed applies to --random-init (a weights file names its own)"),
        (["--no-weights", "--random-init", "--arch", "vit_tiny", "--patch-embed", "conv3"], 2,
         "unknown patch embedding 'conv3'; choose one of linear, conv"),
        (["--no-weights", "--random-init", "--arch", "vit_tiny", "--patch-size", "0"], 2,
         "--patch-size must be positive, got 0"),
        (["--no-weights", "--random-init", "--arch", "vit_tiny", "--patch-size", "64"], 2,
         "a 32x32 crop is smaller than one 64-pixel ViT patch"),
    ],
)
def test_cli_errors(tmp_path: Path, cli, args: list[str], code: int, message: str) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2})
    weights = export(tiny_vit(), tmp_path / "w.safetensors")
    base = {"--weights": str(weights), "--data": str(root), "--output": str(tmp_path / "f.safetensors"),
            "--resize": "32", "--crop-size": "32"}
    extra: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--no-weights":
            del base["--weights"]
        elif arg in ("--raw-pixels", "--random-init"):
            extra.append(arg)
        elif arg == "--corrupt":
            (root / "a" / "bad.png").write_bytes(b"not a png at all")
        else:
            value = next(it).replace("{missing}", str(tmp_path / "nope"))
            if arg in base:
                base[arg] = value
            else:
                extra += [arg, value]
    argv = ["extract", *[x for kv in base.items() for x in kv], *extra, "--num-workers", "0"]
    result = cli.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "f.safetensors").exists()


def test_cli_random_init_with_a_conv_stem_and_mean_patch_token(tmp_path: Path, cli) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2, "b": 1})
    out = tmp_path / "f.safetensors"
    result = cli.invoke(
        app,
        ["extract", "--random-init", "--arch", "vit_tiny", "--patch-size", "4", "--patch-embed", "conv",
         "--pool", "avg", "-d", str(root), "-o", str(out), "--resize", "32", "--crop-size", "32",
         "--num-workers", "0", "--device", "cpu", "--precision", "fp32"],
    )
    assert result.exit_code == 0, result.output
    feats = load_features(out)
    want, _ = backbone_for_eval(
        random_init=True, arch="vit_tiny", patch_size=4, img_size=32, patch_embed="conv", pool="avg"
    )
    expected = extract_folder(want, root, resize=32, crop_size=32)
    torch.testing.assert_close(feats.features, expected.features, rtol=1e-5, atol=1e-5)
    assert feats.metadata["backbone"]["kwargs"] == {"img_size": 32, "patch_size": 4, "patch_embed": "conv", "pool": "avg"}
    cls, _ = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32, patch_embed="conv")
    assert (extract_folder(cls, root, resize=32, crop_size=32).features - feats.features).abs().max() > 1e-3


def test_one_step_knn_extracts_first(tmp_path: Path, cli) -> None:
    train = image_tree(tmp_path / "train", {"a": 4, "b": 4}, seed=0)
    val = image_tree(tmp_path / "val", {"a": 2, "b": 2}, seed=100)
    out = tmp_path / "r.json"
    result = cli.invoke(
        app,
        ["knn", "--random-init", "--arch", "vit_tiny", "--patch-size", "16", "--train-data", str(train),
         "--val-data", str(val), "--resize", "32", "--crop-size", "32", "-k", "3", "--json", str(out),
         "--num-workers", "0", "--device", "cpu",
         "--precision", "fp32"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["num_train"], data["num_val"], data["num_classes"]) == (8, 4, 2)
    model = tiny_vit(seed=0)  # what --random-init --seed 0 builds
    want = knn_features(
        extract_folder(model, train, resize=32, crop_size=32), extract_folder(model, val, resize=32, crop_size=32), k=3
    )
    assert data["results"][0]["top1"] == want.top1


def cifar_subset(dest: Path, split: str, per_class: int) -> Path:
    for cls in sorted(p.name for p in (CIFAR / split).iterdir()):
        (dest / cls).mkdir(parents=True)
        for img in sorted((CIFAR / split / cls).iterdir())[:per_class]:
            os.symlink(img, dest / cls / img.name)
    return dest


@pytest.mark.slow
def test_extract_then_knn_on_cifar10_sub(tmp_path: Path, cli) -> None:
    if not CIFAR.is_dir():
        pytest.skip(f"the real-image set {CIFAR} is absent")
    weights = export(tiny_vit(seed=0), tmp_path / "w.safetensors")
    files = {}
    for split, n in (("train", 30), ("val", 15)):
        data = cifar_subset(tmp_path / split, split, n)
        files[split] = tmp_path / f"{split}.safetensors"
        args = ["extract", "-w", str(weights), "-d", str(data), "-o", str(files[split]), "--resize", "32",
                "--crop-size", "32", "--batch-size", "100", "--num-workers", "0"]
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
    out = tmp_path / "knn.json"
    result = cli.invoke(app, ["knn", "--train", str(files["train"]), "--val", str(files["val"]), "-k", "10",
                              "-k", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert (data["num_train"], data["num_val"], data["num_classes"]) == (300, 150, 10)
    train, val = load_features(files["train"]), load_features(files["val"])
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and train.features.shape == (300, 192)
    # even random features carry colour and layout: better than the 10 % of chance
    assert all(r["top1"] > 15.0 for r in data["results"])
    assert data["results"][1]["top1"] == knn_features(train, val, k=20).top1


def test_random_init_builds_the_trained_pooling_and_weights_keep_their_own() -> None:
    model, info = backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=4, img_size=32, pool="avg")
    assert model.pool == "avg" and info["backbone"]["kwargs"]["pool"] == "avg"
    with pytest.raises(UsageError, match="--pool applies to --random-init"):
        backbone_for_eval("weights.pth", pool="avg")


@pytest.mark.parametrize("crop, scale, multiple", [(32, (0.35, 1.0), 4), (224, (0.4, 1.0), 16), (96, (0.05, 0.4), 1)])
def test_matched_eval_size_is_the_mean_magnification_of_the_training_crops(crop, scale, multiple) -> None:
    # independent: the magnification 1 / sqrt(s) of crops whose area s is uniform in scale, averaged
    # over a fine grid of s (midpoint rule), times the crop size, to the nearest multiple
    s = np.linspace(*scale, 200_001)
    mean = float(np.mean(1 / np.sqrt((s[1:] + s[:-1]) / 2)))
    assert matched_eval_size(crop, scale, multiple) == multiple * round(crop * mean / multiple)
    assert matched_eval_size(32, (0.35, 1.0), 4) == 40  # the small-data recipe's 32-px crops
    assert matched_eval_size(32, (0.25, 0.25)) == 64  # a quarter of the area: twice the size
    with pytest.raises(UsageError, match="crop scales"):
        matched_eval_size(32, (0.0, 1.0))


class _NanOnCall(torch.nn.Module):
    """Mean colour per channel as the features; NaN on the ``bad``-th call (0-based)."""

    def __init__(self, bad: int | None) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device for extract_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.mean(dim=(2, 3)) + self.anchor
        if self.calls == self.bad:
            feats = feats * float("nan")
        self.calls += 1
        return feats


def test_batches_read_back_in_order_and_a_nan_batch_is_named(tmp_path: Path) -> None:
    """Each batch's features are read once the next is queued: every row still lands where its
    image is, progress counts every image, and a NaN batch names its own images."""
    from dinocli.errors import DinoError
    from dinocli.evaluate import extract_features

    root = image_tree(tmp_path / "imgs", {"a": 5})
    paths = sorted((root / "a").iterdir())
    seen: list[int] = []
    got = extract_features(_NanOnCall(None), paths, resize=32, crop_size=32, batch_size=2, progress=seen.append)
    one_by_one = torch.cat([extract_features(_NanOnCall(None), [p], resize=32, crop_size=32).features for p in paths])
    torch.testing.assert_close(got.features, one_by_one)
    assert seen == [2, 2, 1]
    with pytest.raises(DinoError, match=r"NaN or infinite features \(images 2 to 3\)"):
        extract_features(_NanOnCall(1), paths, resize=32, crop_size=32, batch_size=2)


@pytest.mark.parametrize("loose", [0, 1])
def test_images_beside_class_folders_are_a_warning(tmp_path: Path, cli, loose: int) -> None:
    root = image_tree(tmp_path / "imgs", {"a": 2, "b": 1})
    if loose:
        make_rgb_image(48, 40, seed=9).save(root / "stray.png")
    out = tmp_path / "f.safetensors"
    result = cli.invoke(app, ["extract", "--random-init", "--arch", "vit_tiny", "--patch-size", "16", "-d", str(root),
                              "-o", str(out), "--resize", "32", "--crop-size", "32", "--num-workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    feats = load_features(out)
    if loose:  # the documented rule: a folder tree with loose images is unlabelled, and it says so
        assert feats.classes == [] and set(feats.labels.tolist()) == {-1}
        assert result.stderr.startswith(f"warning: 1 image(s) lie directly in {root} (e.g. stray.png), outside")
    else:
        assert feats.classes == ["a", "b"] and "warning" not in result.stderr
