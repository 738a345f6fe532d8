"""Untrusted and careless input through the ``dino`` command: weights files, k-NN features files,
configuration and plugins. Each case: the message, the exit code, one ``error:`` line, no
traceback, and nothing lost (no code run, no file changed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import broken_files as bf
from dinocli.cli import main
from dinocli.errors import UsageError
from dinocli.registry import ENV_VAR


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the machine's cores are shared, and more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dino(capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``dino`` console entry point in this process: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - main always exits
        code = 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    for i in range(8):
        bf.rgb(40, 36, seed=i).save(root / f"{i}.png")
    return tmp_path / "images"


TRAIN = ["--arch", "vit_tiny", "--patch-size", "8", "--out-dim", "32", "--global-crop-size", "32",
         "--local-crop-size", "16", "--local-crops-number", "1", "--batch-size", "4", "--warmup-epochs",
         "0", "--precision", "fp32", "--device", "cpu", "--no-progress", "--num-workers", "0",
         "--drop-path-rate", "0", "--log-every", "1"]


# -- weights -----------------------------------------------------------------------------------------


def make_weights(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return folder / "nowhere.pth"
    if kind == "folder":
        return folder
    if kind == "zero_byte":
        return bf.zero_byte(folder / "empty.pth")
    if kind == "random_bytes":
        return bf.random_bytes(folder / "noise.pth", 4096, seed=1)
    if kind == "truncated_safetensors":
        return bf.truncated_safetensors(folder / "cut.safetensors")
    if kind == "truncated_checkpoint":
        return bf.truncated_checkpoint(folder / "cut.pth")
    if kind == "text":
        return bf.not_an_image(folder / "page.pth")
    if kind == "other_architecture":
        return bf.other_architecture(folder / "vit_tiny.pth")
    if kind == "code_zip":
        return bf.code_running_checkpoint(folder / "evil.pth", folder / "marker")
    if kind == "code_raw":
        return bf.code_running_raw_pickle(folder / "evil_raw.pth", folder / "marker")
    if kind == "features":
        return features_file(folder / "feats.safetensors")
    if kind == "classifier":
        from dinocli.evaluate.linear import LinearClassifier, save_classifier

        save_classifier(folder / "clf.safetensors", LinearClassifier(torch.zeros(2, 8), torch.zeros(2), ["a", "b"]))
        return folder / "clf.safetensors"
    raise AssertionError(kind)


WEIGHTS_CASES = [
    ("missing", 2, "weights file not found: {path}"),
    ("folder", 2, "{path} is a folder, not a weights file"),
    ("zero_byte", 2, "{path} is empty, not a PyTorch checkpoint"),
    ("random_bytes", 2, "{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"),
    ("text", 2, "{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"),
    ("truncated_checkpoint", 2, "{path} is not a readable PyTorch checkpoint (truncated or corrupted): "
     "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    ("truncated_safetensors", 2, "{path} is not a valid safetensors file: "),
    ("other_architecture", 2,
     "the weights do not fit vit_small: 'cls_token' has shape [1, 1, 192] in the file but [1, 1, 384] in the model"),
    ("code_zip", 1, "refusing to load {path}: it needs the Python object 'posix.mkdir', which could run code"),
    ("code_raw", 1, "refusing to load {path}: it needs the Python object 'posix.mkdir', which could run code"),
    ("features", 2, "{path} is a features file (from 'dino extract'), not backbone weights"),
    ("classifier", 2, "{path} is a linear classifier (from 'dino linear'), not backbone weights"),
]


@pytest.mark.parametrize(("kind", "code", "message"), WEIGHTS_CASES, ids=[c[0] for c in WEIGHTS_CASES])
def test_bad_weights_files_in_extract(tmp_path, images, capsys, kind, code, message):
    weights = make_weights(kind, tmp_path / "weights")
    out = tmp_path / "features.safetensors"
    previous = bf.previous_features(out)
    before = {p: p.read_bytes() for p in (tmp_path / "weights").iterdir() if p.is_file()}
    exit_code, stdout, stderr = dino(
        capsys, "extract", "--data", images, "--output", out, "--weights", weights, "--arch", "vit_small",
        "--resize", "32", "--crop-size", "32", "--num-workers", "0",
    )
    line = bf.error_line(code, exit_code, stderr, stdout)
    assert message.format(path=weights) in line, line
    assert not (tmp_path / "weights" / "marker").exists()  # the pickled code never ran
    assert out.read_bytes() == previous
    assert {p: p.read_bytes() for p in (tmp_path / "weights").iterdir() if p.is_file()} == before


def test_code_running_pickle_would_run_without_the_guard(tmp_path):
    """The control: the corpus file really runs code when unpickled without restrictions."""
    import pickle
    import zipfile

    raw = bf.code_running_raw_pickle(tmp_path / "raw.pth", tmp_path / "ran_raw")
    pickle.loads(raw.read_bytes())
    assert (tmp_path / "ran_raw").is_dir()
    evil = bf.code_running_checkpoint(tmp_path / "evil.pth", tmp_path / "ran_zip")
    with zipfile.ZipFile(evil) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"mkdir" in data


def test_init_from_another_architecture_names_the_key_and_both_shapes(tmp_path, images, capsys):
    weights = bf.other_architecture(tmp_path / "vit_tiny.pth")  # patch 8, 192 wide
    run = tmp_path / "run"
    args = ["pretrain", "--data", images, "--output", run, *TRAIN, "--epochs", "1"]
    code, stdout, stderr = dino(capsys, *args, "--arch", "vit_small", "--init-from", weights)
    line = bf.error_line(2, code, stderr, stdout)
    assert line == ("error: the weights do not fit vit_small: 'cls_token' has shape [1, 1, 192] in the "
                    "file but [1, 1, 384] in the model")
    assert not (run / "checkpoint.pth").exists()


# -- k-NN features files --------------------------------------------------------------------------


def features_file(path: Path, n: int = 20, dim: int = 8, classes: int = 2, seed: int = 0) -> Path:
    from dinocli.evaluate.features_io import Features, save_features

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    save_features(path, Features(torch.randn(n, dim, generator=g), labels, [f"c{i}" for i in range(classes)]))
    return path


def broken_features(kind: str, path: Path) -> Path:
    if kind == "zero_byte":
        return bf.zero_byte(path)
    if kind == "random_bytes":
        return bf.random_bytes(path, 512, seed=3)
    if kind == "labels_missing":
        save_file({"features": torch.randn(20, 8)}, str(path))
    elif kind == "no_rows":
        save_file({"features": torch.zeros(0, 8), "labels": torch.zeros(0, dtype=torch.int64)}, str(path))
    elif kind == "labels_short":
        save_file({"features": torch.randn(20, 8), "labels": torch.zeros(19, dtype=torch.int64)}, str(path))
    elif kind == "nan_train":
        x = torch.randn(20, 8)
        x[7, 3] = float("nan")
        x[11, 0] = float("nan")
        save_file({"features": x, "labels": torch.arange(20) % 2}, str(path))
    elif kind == "dims":
        features_file(path, dim=12)
    elif kind in ("label_past_classes", "label_below_unlabelled", "float_labels"):
        from dinocli.evaluate.features_io import Features, save_features

        save_features(path, Features(torch.randn(20, 8), torch.arange(20) % 2, ["c0", "c1"]))
        labels = {"label_past_classes": torch.arange(20) % 3, "label_below_unlabelled": torch.arange(20) - 2,
                  "float_labels": (torch.arange(20) % 2).float()}[kind]
        with safe_open(str(path), "pt") as f:
            meta, features = f.metadata(), f.get_tensor("features")
        save_file({"features": features, "labels": labels}, str(path), metadata=meta)
    return path


FEATURE_CASES = [
    ("zero_byte", "{path} is not a valid safetensors features file: Error while deserializing header"),
    ("random_bytes", "{path} is not a valid safetensors features file: "),
    ("labels_missing", "{path} is not a dinocli features file: it lacks the labels tensor"),
    ("label_past_classes", "{path}: row 2 has label 2; labels are 0 to 1 for its 2 classes, or -1 for unlabelled"),
    ("label_below_unlabelled", "{path}: row 0 has label -2; labels are 0 to 1 for its 2 classes, or -1 for unlabelled"),
    ("float_labels", "{path}: the labels are float32, not whole numbers"),
    ("no_rows", "the train features must be a non-empty [N, D] matrix"),
    ("labels_short", "{path}: features [20, 8] and labels [19] do not form an [N, D] / [N] pair"),
    ("nan_train", "the train features hold NaN or infinite values (2 rows, the first is row 7)"),
    ("dims", "the train features are 12-dimensional but the val features are 8-dimensional"),
]


@pytest.mark.parametrize(("kind", "message"), FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_bad_features_files_in_knn(tmp_path, capsys, kind, message):
    train = broken_features(kind, tmp_path / "train.safetensors")
    val = features_file(tmp_path / "val.safetensors", n=6, seed=1)
    report = tmp_path / "knn.json"
    report.write_text('{"previous": true}\n')
    before = train.read_bytes()
    code, stdout, stderr = dino(capsys, "knn", "--train", train, "--val", val, "-k", "3", "--json", report)
    line = bf.error_line(2, code, stderr, stdout)
    assert message.format(path=train) in line, line
    assert json.loads(report.read_text()) == {"previous": True}
    assert train.read_bytes() == before


# -- output paths ------------------------------------------------------------------------------------


@pytest.fixture
def outputs_setup(tmp_path: Path, images: Path) -> dict[str, Path]:
    """What every writing command reads (images, weights, features), and a file where a folder must be."""
    import dinocli

    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    save_file(dinocli.create_backbone("vit_tiny", patch_size=8, img_size=32).state_dict(), str(weights))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder must be")
    return {"images": images, "weights": weights, "features": features_file(tmp_path / "f.safetensors"),
            "blocker": blocker, "folder": images / "cls", "file": images / "cls" / "0.png"}


EXTRACT = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--resize", "32", "--crop-size", "32",
           "--num-workers", "0", "--device", "cpu"]
OUTPUT_CASES = [
    (["extract", "-d", "{images}", *EXTRACT, "-o", "{blocker}/f.safetensors"], "--output {blocker}/f.safetensors: "),
    (["extract", "-d", "{images}", *EXTRACT, "-o", "{folder}"], "--output {folder} is a folder; give a file name"),
    (["knn", "--train", "{features}", "--val", "{features}", "--json", "{blocker}/k.json"], "--json {blocker}/k.json: "),
    (["linear", "--train", "{features}", "--val", "{features}", "--json", "{blocker}/l.json"],
     "--json {blocker}/l.json: "),
    (["linear", "--train", "{features}", "--val", "{features}", "-o", "{blocker}/c.safetensors"],
     "--output {blocker}/c.safetensors: "),
    (["export", "-w", "{weights}", "-o", "{blocker}/w.safetensors"], "--output {blocker}/w.safetensors: "),
    (["export", "-w", "{weights}", "-o", "{folder}", "--force"], "--output {folder} is a folder; give a file name"),
    (["attn-maps", "{file}", "-w", "{weights}", "-o", "{blocker}/maps"], "--output {blocker}/maps: "),
    (["attn-maps", "{file}", "-w", "{weights}", "-o", "{file}"], "--output {file} is a file; give a folder"),
    (["pretrain", "--data", "{images}", *TRAIN, "--epochs", "1", "--output", "{blocker}/run"],
     "--output {blocker}/run: "),
    (["pretrain", "--data", "{images}", *TRAIN, "--epochs", "1", "--output", "{file}"],
     "--output {file} is a file; give a folder"),
    (["shards", "-d", "{images}", "-o", "{blocker}/s-%06d.tar"], "--output {blocker}/s-000000.tar: "),
]


@pytest.mark.parametrize(("args", "message"), OUTPUT_CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(OUTPUT_CASES)])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, outputs_setup, capsys, args, message):
    paths = {k: str(v) for k, v in outputs_setup.items()}
    before = sorted(p for p in tmp_path.rglob("*"))
    code, stdout, stderr = dino(capsys, *[a.format(**paths) for a in args])
    line = bf.error_line(2, code, stderr, stdout)
    assert message.format(**paths) in line, line
    if message.endswith(": "):  # a path under a file: the message names that file
        assert line.endswith(f"{outputs_setup['blocker']} is a file, not a folder"), line
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind
    assert outputs_setup["blocker"].read_text() == "a file where a folder must be"


# -- configuration ----------------------------------------------------------------------------------


CLI_CONFIG_CASES = [
    (["--warmup-epoch", "3"], "No such option: --warmup-epoch (Possible options: --warmup-epochs,"),
    (["--bacth-size", "4"], "No such option: --bacth-size (Possible options: --batch-size,"),
    (["--batch-size", "four"], "Invalid value for '--batch-size'"),
    (["--lr", "fast"], "Invalid value for '--lr'"),
    (["--norm-last-layer", "yes"], "Got unexpected extra argument"),
    (["--global-crops-scale", "0.5"], "Option '--global-crops-scale' requires 2 arguments"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--num-workers", "-5"], "--num-workers must be -1 (from the cores) or at least 0, got -5"),
    (["--epochs", "5", "--warmup-epochs", "10"], "--warmup-epochs 10 is longer than the run (--epochs 5); give at most 5 (the reference warms up for a tenth of the run: --warmup-epochs 0)"),
    (["--global-crops-scale", "0.5", "1.5"], "--global-crops-scale must satisfy 0 < min <= max <= 1, got 0.5 1.5"),
    (["--local-crops-scale", "0", "0.4"], "--local-crops-scale must satisfy 0 < min <= max <= 1, got 0.0 0.4"),
    (["--optimizer", "adam"], "unknown value for --optimizer 'adam'. Did you mean 'adamw'?"),
    (["--on-bad-image", "ignore"], "unknown value for --on-bad-image 'ignore'. Available: fail, skip."),
    (["--arch", "vit_smal"], "unknown backbone 'vit_smal'. Did you mean 'vit_small'?"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CONFIG_CASES, ids=[" ".join(c[0]) for c in CLI_CONFIG_CASES])
def test_bad_options_on_the_command_line(tmp_path, images, capsys, args, message):
    run = tmp_path / "run"
    code, stdout, stderr = dino(capsys, "pretrain", "--data", images, "--output", run, *args)
    line = bf.error_line(2, code, stderr, stdout)
    assert message in line, line
    assert not (run / "checkpoint.pth").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "16"], "8 images are fewer than one global batch of 16"),
        (["--init-from", "{tmp}/missing.pth"], "weights file not found"),
        (["--collapse", "centring"], "unknown collapse strategy 'centring'"),
        (["--patch-size", "24"], "a 16x16 crop is smaller than one 24-pixel ViT patch"),  # the local crops
    ],
)
def test_a_run_that_cannot_start_leaves_no_output_folder(tmp_path, images, capsys, args, message):
    run = tmp_path / "runs" / "first"
    args = [a.format(tmp=tmp_path) for a in args]
    code, stdout, stderr = dino(capsys, "pretrain", "--data", images, "--output", run, *TRAIN, *args)
    assert message in bf.error_line(2, code, stderr, stdout)
    assert not (tmp_path / "runs").exists()


TOML_CASES = [
    ("bacth_size = 4", "unknown option 'bacth_size' in {path}. Did you mean 'batch_size'?"),
    ("warmup-epoch = 4", "unknown option 'warmup_epoch' in {path}. Did you mean 'warmup_epochs'?"),
    ("[model]\narch = 'vit_tiny'", "unknown option 'model' in {path}."),
    ('batch_size = "64"', "'batch_size' in {path} must be an integer, got '64'"),
    ("epochs = 1.5", "'epochs' in {path} must be an integer, got 1.5"),
    ("lr = true", "'lr' in {path} must be a number, got True"),
    ("compile = 'no'", "'compile' in {path} must be true or false, got 'no'"),
    ("global_crops_scale = [0.4, 'one']", "'global_crops_scale' in {path} must be a list of 2 numbers"),
    ("arch = ['vit_small']", "'arch' in {path} must be a string, got ['vit_small']"),
    ("batch_size = 0", "--batch-size must be positive, got 0"),
    ("epochs = 3\nwarmup_epochs = 4", "--warmup-epochs 4 is longer than the run (--epochs 3)"),
    ("global_crops_scale = [0.4, 1.2]", "--global-crops-scale must satisfy 0 < min <= max <= 1, got 0.4 1.2"),
    ("lr = inf", "--lr must be a finite number >= 0, got inf"),
    ("lr = 0.1\nlr = 0.2", "{path} is not valid TOML: Cannot overwrite a value"),
    ("epochs = ", "{path} is not valid TOML: "),
]


@pytest.mark.parametrize(("text", "message"), TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_toml_files(tmp_path, images, capsys, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text + "\n", encoding="utf-8")
    code, stdout, stderr = dino(capsys, "pretrain", "--config", path, "--data", images, "--output", tmp_path / "run")
    line = bf.error_line(2, code, stderr, stdout)
    assert message.format(path=path) in line, line


def test_a_toml_file_that_is_not_text(tmp_path, images, capsys):
    path = bf.random_bytes(tmp_path / "config.toml", 256, seed=5)
    code, stdout, stderr = dino(capsys, "pretrain", "--config", path, "--data", images, "--output", tmp_path / "run")
    assert f"error: {path} is not valid TOML: " in bf.error_line(2, code, stderr, stdout)
    missing = tmp_path / "nope.toml"
    code, stdout, stderr = dino(capsys, "pretrain", "--config", missing, "--data", images, "--output", tmp_path / "run")
    assert bf.error_line(2, code, stderr, stdout) == f"error: config file not found: {missing}"
    code, stdout, stderr = dino(capsys, "pretrain", "--config", images, "--data", images, "--output", tmp_path / "run")
    assert bf.error_line(2, code, stderr, stdout) == f"error: --config {images} is a folder; give a TOML file"


# -- plugins -----------------------------------------------------------------------------------------


@pytest.fixture
def plugin_site(tmp_path, monkeypatch, fresh_registry):
    """A folder on ``sys.path`` to install plugins into; the registry is reloaded around the test."""
    import sys

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(ENV_VAR, raising=False)
    created = []

    def install(entry_point: str, module: str, source: str) -> None:
        bf.install_plugin(site, entry_point, module, source)
        created.append(module)

    yield install
    for module in created:
        sys.modules.pop(module, None)


def test_plugin_that_fails_to_import_is_named(plugin_site, tmp_path, images, capsys):
    plugin_site("dinotest-noimport", "dinotest_noimport", "import a_module_that_is_not_installed\n")
    code, stdout, stderr = dino(
        capsys, "pretrain", "--data", images, "--output", tmp_path / "run", *TRAIN, "--arch", "noimport_net"
    )
    line = bf.error_line(2, code, stderr, stdout)
    assert line.startswith("error: unknown backbone 'noimport_net'.")
    assert line.endswith("Disabled by errors: plugin 'dinotest-noimport' (see 'dino plugins').")
    assert ("dinocli: plugin 'dinotest-noimport' disabled: failed to import dinotest_noimport: "
            "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'") in stderr.splitlines()


BROKEN_BACKBONES = {
    "raises": ("def make(**kwargs):\n    raise ValueError('no weights for img_size 32')\n",
               "backbone 'broken_net' from plugin 'dinotest-broken' failed to build: "
               "ValueError: no weights for img_size 32"),
    "not_a_module": ("def make(**kwargs):\n    return 'a string'\n",
                     "backbone 'broken_net' from plugin 'dinotest-broken' is broken: its factory must "
                     "return an nn.Module with an integer embed_dim, got str"),
    "no_embed_dim": ("import torch\ndef make(**kwargs):\n    return torch.nn.Linear(3, 4)\n",
                     "backbone 'broken_net' from plugin 'dinotest-broken' is broken: its factory must "
                     "return an nn.Module with an integer embed_dim, got embed_dim=None"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_BACKBONES))
def test_plugin_with_a_broken_backbone_is_named(plugin_site, tmp_path, images, capsys, kind):
    body, message = BROKEN_BACKBONES[kind]
    plugin_site("dinotest-broken", "dinotest_broken", body + (
        "import dinocli\n"
        "@dinocli.hookimpl\n"
        "def dinocli_register_backbones(register):\n"
        "    register('broken_net', make)\n"
    ))
    for args in (["pretrain", "--data", images, "--output", tmp_path / "run", *TRAIN, "--arch", "broken_net"],
                 ["extract", "--data", images, "--output", tmp_path / "f.safetensors", "--random-init",
                  "--arch", "broken_net", "--resize", "32", "--crop-size", "32", "--num-workers", "0"]):
        code, stdout, stderr = dino(capsys, *args)
        assert bf.error_line(1, code, stderr, stdout) == f"error: {message}"
    assert not (tmp_path / "f.safetensors").exists()


BROKEN_OUTPUTS = """
    import torch
    import dinocli
    from dinocli.strategies.centering import Centering

    class Narrow(torch.nn.Module):
        embed_dim = 16

        def __init__(self, **kwargs):
            super().__init__()
            self.proj = torch.nn.Linear(3, 8)

        def forward(self, x):
            return self.proj(x.mean(dim=(2, 3)))  # 8 wide, not embed_dim

    class Uncropped:
        n_global, n_local = 2, 1

        def __init__(self, **kwargs):
            pass

        def __call__(self, image, generator):
            return [image] * 3  # PIL images, not tensors

    class FixedLocal(Uncropped):
        def __init__(self, local_crops_number=8, **kwargs):
            pass  # keeps n_local = 1 whatever it is asked for

    class Odd(Centering):
        def __init__(self, out_dim, odd="", **kwargs):
            super().__init__(out_dim)
            self.odd = odd

        def targets(self, teacher_logits, temperature):
            if self.odd == "narrow":
                return torch.softmax(teacher_logits[:, :10], dim=-1)
            if self.odd == "logits":
                return teacher_logits / temperature
            return super().targets(teacher_logits, temperature)

        def regularizer(self, embeddings, logits):
            return logits.mean(dim=1) if self.odd == "vector" else None

        def metrics(self):
            return {"center": self.center} if self.odd == "tensor" else {}

    class NoTargets(dinocli.CollapseStrategy):
        pass  # provides_targets = True, inherited, and the base class's targets()

    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        register("narrow_net", Narrow)

    @dinocli.hookimpl
    def dinocli_register_augmentations(register):
        register("uncropped", Uncropped)
        register("fixed_local", FixedLocal)

    @dinocli.hookimpl
    def dinocli_register_collapse_strategies(register):
        for odd in ("narrow", "logits", "vector", "tensor"):
            register(f"odd-{odd}", lambda odd=odd, **kw: Odd(odd=odd, **kw))
        register("not-a-strategy", lambda **kw: object())
        register("no-targets", lambda **kw: NoTargets())
"""

IN_RUN = "at epoch 1, iteration 1: "
KEPT = "; no checkpoint was written yet"  # a fresh run failing at its first iteration
BROKEN_OUTPUT_CASES = {
    "backbone width": (["--arch", "narrow_net"],
                       "backbone 'narrow_net' from plugin 'dinotest-outputs' returned a [8, 8] tensor for a batch of "
                       "[8, 3, 32, 32]; a backbone returns [images, embed_dim] = [8, 16]"),
    "crops that are not tensors": (["--augmentation", "uncropped"],
                                   "augmentation 'uncropped' from plugin 'dinotest-outputs' returned a PngImageFile as crop 0; "
                                   "an augmentation returns n_global + n_local = 2 + 1 float tensors [3, h, w], the "
                                   "global crops first"),
    "n_local": (["--augmentation", "fixed_local", "--local-crops-number", "4"],
                "augmentation 'fixed_local' from plugin 'dinotest-outputs' is broken: it makes n_local=1 local crops "
                "when asked for local_crops_number=4"),
    "not a strategy": (["--collapse", "not-a-strategy"],
                       "collapse strategy 'not-a-strategy' from plugin 'dinotest-outputs' is broken: its factory must "
                       "return a dinocli.CollapseStrategy, got object"),
    "targets missing": (["--collapse", "no-targets"],
                        "collapse strategy 'no-targets' from plugin 'dinotest-outputs' is broken: NoTargets has "
                        "provides_targets = True (the default) but does not define targets(); a strategy that only "
                        "adds a regulariser sets provides_targets = False"),
    "targets shape": (["--collapse", "odd-narrow"],
                      "collapse strategy 'odd-narrow' from plugin 'dinotest-outputs' returned a [8, 10] tensor for "
                      "[8, 32] teacher logits from targets() " + IN_RUN + "targets() returns probabilities of the "
                      "teacher logits' shape, rows summing to 1" + KEPT),
    "targets values": (["--collapse", "odd-logits"],
                       "collapse strategy 'odd-logits' from plugin 'dinotest-outputs' returned targets that are not "
                       "probabilities (smallest value "),
    "regulariser shape": (["--collapse", "odd-vector"],
                          "collapse strategy 'odd-vector' from plugin 'dinotest-outputs' returned a [12] tensor from "
                          "regularizer() " + IN_RUN + "regularizer() returns a scalar tensor or None" + KEPT),
    "metrics": (["--collapse", "odd-tensor"],
                "collapse strategy 'odd-tensor' from plugin 'dinotest-outputs' returned a [1, 32] tensor as 'center' "
                "from metrics() " + IN_RUN + "metrics() returns a dict of numbers" + KEPT),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OUTPUT_CASES))
def test_a_plugin_that_returns_the_wrong_thing_is_named_with_what_it_returned(
    plugin_site, tmp_path, images, capsys, case
):
    plugin_site("dinotest-outputs", "dinotest_outputs", BROKEN_OUTPUTS)
    args, message = BROKEN_OUTPUT_CASES[case]
    run = tmp_path / "run"
    code, stdout, stderr = dino(capsys, "pretrain", "--data", images, "--output", run, *TRAIN, *args)
    line = bf.error_line(1, code, stderr, stdout)
    assert line.startswith("error: " + message.format(checkpoint=run / "checkpoint.pth")), line


def test_extract_refuses_features_of_another_width_than_the_backbone_says(plugin_site, tmp_path, images, capsys):
    plugin_site("dinotest-outputs", "dinotest_outputs", BROKEN_OUTPUTS)
    out = tmp_path / "f.safetensors"
    code, stdout, stderr = dino(capsys, "extract", "--data", images, "--output", out, "--random-init", "--arch",
                                "narrow_net", "--resize", "32", "--crop-size", "32", "--num-workers", "0")
    assert bf.error_line(1, code, stderr, stdout) == (
        "error: backbone Narrow returned a [8, 8] tensor for a batch of [8, 3, 32, 32]; a backbone returns "
        "[images, embed_dim] = [8, 16]"
    )
    assert not out.exists()


FLAKY_STRATEGY = """
    import torch
    import dinocli

    class Flaky(dinocli.CollapseStrategy):
        def __init__(self, **kwargs):
            super().__init__()
            self.calls = 0

        def targets(self, teacher_logits, temperature):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("prototype buffer overflow")
            return torch.softmax(teacher_logits / temperature, dim=-1)

    @dinocli.hookimpl
    def dinocli_register_collapse_strategies(register):
        register("flaky", Flaky)
"""


def test_strategy_that_raises_during_training_is_named_and_the_checkpoint_kept(
    plugin_site, tmp_path, images, capsys
):
    plugin_site("dinotest-flaky", "dinotest_flaky", FLAKY_STRATEGY)
    run = tmp_path / "run"
    # 8 images, batches of 4: iterations 1-2 are epoch 1 (saved), the third call raises
    code, stdout, stderr = dino(
        capsys, "pretrain", "--data", images, "--output", run, *TRAIN, "--collapse", "flaky", "--epochs", "2"
    )
    line = bf.error_line(1, code, stderr, stdout)
    assert line == (
        "error: collapse strategy 'flaky' from plugin 'dinotest-flaky' raised in targets() at epoch 2, "
        f"iteration 3: RuntimeError: prototype buffer overflow; the last checkpoint ({run / 'checkpoint.pth'}) "
        "is intact"
    )
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["config"]["collapse"]) == (1, 2, "flaky")


def test_written_files_and_folders_have_the_umask_permissions_not_the_temporary_ones(tmp_path):
    import os

    from dinocli.io import atomic_folder, atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "weights.safetensors") as tmp:
            tmp.write_bytes(b"x")
        with atomic_folder(tmp_path / "hf") as tmp:
            (tmp / "config.json").write_text("{}")
        with atomic_path(tmp_path / "features.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))  # recreates the file: a mode set before is lost
    finally:
        os.umask(previous)
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == 0o644  # mkstemp makes 0600
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755  # mkdtemp makes 0700
    assert (tmp_path / "features.safetensors").stat().st_mode & 0o777 == 0o644


def test_an_output_is_refused_before_any_work_where_it_would_destroy_an_input_or_another_file(tmp_path, capsys):
    from dinocli.io import JSON_FILE, check_output_path

    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {}}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(UsageError, match=r"--output .*checkpoint.pth is also --weights: writing it would destroy it"):
        check_output_path(tmp_path / "." / "checkpoint.pth", "--output", inputs=[("--weights", checkpoint)])
    with pytest.raises(UsageError, match=r"--json .*checkpoint.pth exists and is not a JSON file; remove it or give"):
        check_output_path(checkpoint, "--json", replaces=JSON_FILE)
    (tmp_path / "old.json").write_text('{"top1": 1.0}')
    check_output_path(tmp_path / "old.json", "--json", replaces=JSON_FILE)  # an earlier report is replaced
    check_output_path(tmp_path / "new" / "r.json", "--json", replaces=JSON_FILE)  # its folder is made later
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "old.json"]
    # through the commands: nothing is read, nothing written
    feats = features_file(tmp_path / "train.safetensors")
    model = tmp_path / "model.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 8)}, str(model))
    for args, message in [
        (["knn", "--train", feats, "--val", feats, "--json", checkpoint], "exists and is not a JSON file"),
        (["linear", "--train", feats, "--val", feats, "-o", checkpoint], "exists and is not a linear classifier file"),
        (["linear", "--train", feats, "--val", feats, "--json", feats], "is also --train: writing it would destroy it"),
        (["extract", "-w", checkpoint, "-d", tmp_path, "-o", checkpoint], "is also --weights: writing it would destroy"),
        (["extract", "-w", checkpoint, "-d", tmp_path, "-o", model], "exists and is not a features file"),
        (["export", "-w", checkpoint, "-o", checkpoint, "--force"], "is also --weights: writing it would destroy it"),
    ]:
        code, stdout, stderr = dino(capsys, *args)
        assert message in bf.error_line(2, code, stderr, stdout), args
    assert checkpoint.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (a folder no one can write in)")
def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    feats = features_file(tmp_path / "train.safetensors")
    code, stdout, stderr = dino(capsys, "knn", "--train", feats, "--val", feats, "--json", "/proc/knn.json")
    assert "--json /proc/knn.json: cannot write in /proc (" in bf.error_line(2, code, stderr, stdout)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "iteration": 1, "loss": 2.0}\n')
    code, stdout, stderr = dino(capsys, "report", tmp_path, "--output", "/proc/report")
    assert "--output /proc/report: cannot write in /proc (" in bf.error_line(2, code, stderr, stdout)
