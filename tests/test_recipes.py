"""Recipes: complete configurations, explicit options win, auto scales as documented."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import dinocli
from dinocli.errors import DinoError, UsageError
from dinocli.recipes import auto, crops_for, describe_data, momentum_for, prototypes_for, small_data
from dinocli.train import resolve_config
from dinocli.train.config import FIELDS


@pytest.fixture()
def small_images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_builtin_recipes_are_registered_through_entry_points():
    assert {"reference", "small-data", "auto"} <= set(dinocli.list_recipes())
    assert dinocli.get_registry().get("recipes", "auto").plugin == "recipes"


@pytest.mark.parametrize("name", ["reference", "small-data", "auto"])
def test_each_recipe_resolves_to_a_complete_valid_configuration(name, small_images, tmp_path):
    cfg = resolve_config(overrides={"recipe": name, "data": str(small_images), "output": str(tmp_path / "r")})
    assert cfg.recipe == name
    for key in FIELDS:
        assert getattr(cfg, key) is not None


def test_reference_recipe_changes_nothing(small_images):
    base = {"data": str(small_images), "output": "run"}
    assert resolve_config(overrides={**base, "recipe": "reference"}) == resolve_config(overrides=base)


def test_explicit_options_override_the_recipe(small_images, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("out_dim = 777\n")
    lines = []
    cfg = resolve_config(
        toml, {"recipe": "small-data", "data": str(small_images), "output": "r", "lr": 0.01},
        explain=lines.append,
    )
    assert (cfg.out_dim, cfg.lr) == (777, 0.01)  # file and command line beat the recipe
    assert (cfg.arch, cfg.patch_size, cfg.momentum_teacher) == ("vit_tiny", 4, 0.95)  # from it
    assert (cfg.collapse, cfg.patch_embed, cfg.depth) == ("sinkhorn-knopp,koleo", "conv", 6)
    assert not any(line.startswith(("recipe small-data: out_dim ", "recipe small-data: lr ")) for line in lines)
    assert any(line.startswith("recipe small-data: momentum_teacher = 0.95") for line in lines)


def test_small_data_fits_warmups_to_the_epochs():
    values = {k: v for k, (v, _) in small_data(epochs=12).items()}
    assert values["epochs"] == 12
    assert values["warmup_epochs"] == 1 and values["teacher_temp"] == 0.04
    long = {k: v for k, (v, _) in small_data(epochs=300).items()}
    assert long["warmup_epochs"] == 10
    assert (values["out_dim"], values["momentum_teacher"]) == (4096, 0.95)  # data set size unknown


def test_small_data_and_auto_agree_on_cifar_like_data():
    """5,000 32-px images for 10 epochs (cifar10_sub): auto chooses exactly what small-data sets."""
    def chosen(recipe, **context):
        return {k: v for k, (v, _) in recipe(**context).items()}

    small = chosen(small_data, n_images=5000, epochs=10)
    assert small.pop("epochs") == 10  # small-data also fixes a default run length: auto does not
    assert chosen(auto, n_images=5000, image_size=32, epochs=10) == small
    assert (small["out_dim"], small["momentum_teacher"]) == (4096, 0.95)


@pytest.mark.parametrize(
    "n_images, prototypes, momentum",
    [
        (1_000, 1024, 0.95),        # 30 epochs x 15 iterations: horizon at its floor of 20
        (10_000, 8192, 0.9915),     # 30 x 156 = 4680 iterations: horizon 117
        (1_000_000, 65536, 0.996),  # ImageNet-sized: the reference's values
    ],
)
def test_auto_scales_prototypes_and_momentum(n_images, prototypes, momentum):
    values = {k: v for k, (v, _) in auto(n_images=n_images, image_size=32, epochs=30).items()}
    small = {k: v for k, (v, _) in small_data(n_images=n_images, epochs=30).items()}
    assert (small["out_dim"], small["momentum_teacher"]) == (values["out_dim"], values["momentum_teacher"])
    assert values["out_dim"] == prototypes
    assert values["momentum_teacher"] == pytest.approx(momentum, abs=1e-4)
    horizon = 1 / (1 - values["momentum_teacher"])
    iterations = 30 * (n_images // 64)
    assert horizon == pytest.approx(min(250, max(20, iterations / 40)), rel=1e-2)
    assert values["arch"] == ("vit_small" if n_images >= 100_000 else "vit_tiny")
    assert values.get("collapse", "centering") == (
        "centering" if n_images >= 100_000 else "sinkhorn-knopp,koleo"
    )
    if n_images < 100_000:
        assert (values["patch_embed"], values["lr"], values["depth"]) == ("conv", 0.0005, 6)
    else:  # the reference's patch projection, depth and learning rate: auto leaves them alone
        assert "patch_embed" not in values and "lr" not in values and "depth" not in values


def test_auto_gives_every_choice_a_reason_and_picks_crops_from_image_size():
    for value, reason in auto(n_images=5000, image_size=500, epochs=100).values():
        assert reason
    assert crops_for(32) == {"global_crop_size": 32, "local_crop_size": 16, "patch_size": 4}
    assert crops_for(500)["global_crop_size"] == 224 and crops_for(500)["patch_size"] == 16
    assert prototypes_for(2) == 1024 and momentum_for(10**9) == 0.996


def test_auto_reads_the_data_set(small_images, tmp_path):
    stats = describe_data(small_images)
    assert (stats.n_images, stats.image_size) == (12, 32)
    lines = []
    cfg = resolve_config(
        overrides={"recipe": "auto", "data": str(small_images), "output": str(tmp_path), "epochs": 5},
        explain=lines.append,
    )
    assert (cfg.global_crop_size, cfg.patch_size, cfg.out_dim) == (32, 4, 1024)
    assert any("12 images" in line for line in lines)


def test_unknown_recipe_suggests_the_closest(small_images):
    with pytest.raises(UsageError, match="Did you mean 'small-data'"):
        resolve_config(overrides={"recipe": "small_data", "data": str(small_images), "output": "r"})


def test_auto_needs_an_existing_data_folder(tmp_path):
    with pytest.raises(UsageError, match="--recipe auto needs an image folder"):
        resolve_config(overrides={"recipe": "auto", "data": str(tmp_path / "absent"), "output": "r"})


def test_cli_prints_each_recipe_choice_before_training(small_images, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dinocli", "pretrain", "--recipe", "auto", "--data", str(small_images),
         "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--out-dim", "32",
         "--local-crops-number", "2", "--num-workers", "0", "--precision", "fp32", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first_training_line = proc.stderr.index("# dinocli pretrain configuration")
    explained = proc.stderr[:first_training_line]
    assert "recipe auto: momentum_teacher = " in explained and "(teacher EMA horizon" in explained
    assert "recipe auto: out_dim" not in explained  # given on the command line: no recipe choice


def test_recipe_patch_embed_is_overridable_and_ignored_by_resnets(small_images, tmp_path):
    base = {"recipe": "small-data", "data": str(small_images), "output": str(tmp_path / "r")}
    assert resolve_config(overrides=base).patch_embed == "conv"
    assert resolve_config(overrides={**base, "patch_embed": "linear"}).patch_embed == "linear"
    assert resolve_config(overrides={**base, "recipe": "reference"}).patch_embed == "linear"
    with pytest.raises(UsageError, match="patch-embed"):
        resolve_config(overrides={**base, "patch_embed": "convolutional"})
    cfg = resolve_config(overrides={**base, "arch": "resnet18"})
    resnet = dinocli.create_backbone(
        cfg.arch, patch_size=cfg.patch_size, patch_embed=cfg.patch_embed, img_size=32
    )
    assert resnet.stem == "small"  # a backbone without patches ignores the recipe's patch embedding


def _recipe_plugin(**recipes):
    @dinocli.hookimpl
    def dinocli_register_recipes(register):
        for name, factory in recipes.items():
            register(name, factory)

    return SimpleNamespace(dinocli_register_recipes=dinocli_register_recipes)


@pytest.mark.parametrize(
    "factory, error, message",
    [
        (lambda **_: None, DinoError,
         "recipe 'odd' from plugin 'recipes-test' is broken: its factory must return a mapping of option "
         "names to values, got NoneType"),
        (lambda **_: 1 / 0, DinoError,
         "recipe 'odd' from plugin 'recipes-test' failed to build: ZeroDivisionError: division by zero"),
        (lambda **_: {"out_dimm": 512}, UsageError,
         "unknown option 'out_dimm' in recipe 'odd' from plugin 'recipes-test'. Did you mean 'out_dim'?"),
    ],
    ids=["not-a-mapping", "raises", "unknown-option"],
)
def test_a_broken_recipe_is_named_with_its_plugin(fresh_registry, small_images, factory, error, message):
    from dinocli.registry import PluginInfo

    registry = dinocli.get_registry()
    registry.add_plugin(_recipe_plugin(odd=factory), PluginInfo("recipes-test", "recipes-test", "0", False))
    with pytest.raises(error) as caught:
        resolve_config(overrides={"recipe": "odd", "data": str(small_images), "output": "r"})
    assert str(caught.value).startswith(message)
    assert type(caught.value) is error  # a plugin's bug is exit code 1, a wrong value 2
