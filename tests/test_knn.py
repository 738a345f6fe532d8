"""Weighted k-NN: the reference's vote against an independent brute force, indexes, files, CLI errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dinocli.cli import app
from dinocli.evaluate import (
    Features,
    IndexSpec,
    knn_classify,
    load_features,
    save_features,
)
from dinocli.evaluate import features_io
from dinocli.errors import UsageError
from dinocli.evaluate.knn import default_nlist, pq_codes, ranked_classes, recall_at_k, target_rank


def clustered(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around one random center per class (centers fixed by class count and dim)."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1000 + classes + dim))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + noise * torch.randn(n, dim, generator=g), labels


def brute_force_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Reference vote written independently: full cosine matrix, argsort, one-hot sums, ranks."""
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    sim = b @ a.T
    order = sim.argsort(dim=1, descending=True)[:, :k]
    top_sims = sim.gather(1, order)
    one_hot = torch.nn.functional.one_hot(train_labels[order], num_classes).double()
    scores = (one_hot * torch.exp(top_sims / T)[..., None]).sum(dim=1)
    target = scores.gather(1, test_labels[:, None])
    cls = torch.arange(num_classes)[None, :]
    # rank = classes scoring higher, plus equal-scoring classes with a lower index
    rank = (scores > target).sum(1) + ((scores == target) & (cls < test_labels[:, None])).sum(1)
    n = len(test_labels)
    return 100.0 * (rank == 0).sum().item() / n, 100.0 * (rank < 5).sum().item() / n


@pytest.mark.parametrize("classes", [3, 12])
def test_vote_matches_independent_brute_force(classes: int) -> None:
    train, ytrain = clustered(600, 32, classes, noise=2.0, seed=1)
    test, ytest = clustered(150, 32, classes, noise=2.0, seed=2)
    ks, temps = [1, 5, 20, 60], [0.02, 0.07, 0.5]
    report = knn_classify(train, ytrain, test, ytest, ks, temps, batch_size=37)
    assert [(r.k, r.temperature) for r in report.results] == [(k, t) for k in ks for t in temps]
    assert report.num_classes == classes and report.num_train == 600 and report.num_val == 150
    top1s = set()
    for r in report.results:
        top1, top5 = brute_force_knn(train, ytrain, test, ytest, r.k, r.temperature, classes)
        assert r.top1 == pytest.approx(top1, abs=1e-9), (r.k, r.temperature)
        assert r.top5 == (None if r.k < 5 or classes < 5 else pytest.approx(top5, abs=1e-9))
        top1s.add(r.top1)
    # the features are hard enough that the accuracies differ between settings
    assert len(top1s) > 3 and 100 / classes < min(top1s) < 100


def test_temperature_decides_between_one_close_and_two_farther_neighbours() -> None:
    # The query is e0; train: one class-0 vector at cosine 0.9, two class-1 vectors at cosine 0.8.
    c9, c8 = 0.9, 0.8
    train = torch.tensor([[c9, math.sqrt(1 - c9**2)], [c8, math.sqrt(1 - c8**2)], [c8, -math.sqrt(1 - c8**2)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # exp(0.9/T) > 2 exp(0.8/T)  <=>  T < 0.1 / ln 2 = 0.144
    assert math.exp(c9 / 0.07) > 2 * math.exp(c8 / 0.07)
    assert math.exp(c9 / 1.0) < 2 * math.exp(c8 / 1.0)
    assert knn_classify(train, labels, query, torch.tensor([0]), k=3, temperature=0.07).top1 == 100.0
    assert knn_classify(train, labels, query, torch.tensor([0]), k=3, temperature=1.0).top1 == 0.0
    assert knn_classify(train, labels, query, torch.tensor([1]), k=3, temperature=1.0).top1 == 100.0
    # k=1: only the closest votes, at any temperature
    assert knn_classify(train, labels, query, torch.tensor([0]), k=1, temperature=1.0).top1 == 100.0


def test_classes_come_from_the_labels_and_few_val_images_work() -> None:
    train, ytrain = clustered(40, 8, 2, noise=0.1, seed=3)
    test, ytest = clustered(3, 8, 2, noise=0.1, seed=4)
    report = knn_classify(train, ytrain, test, ytest, k=[5, 10])
    assert report.num_classes == 2 and report.num_val == 3
    assert report.top1 == 100.0 and report.top5 is None  # two classes: a top-5 would be 100 %


def test_approximate_indexes_recall_against_exact_search() -> None:
    train, ytrain = clustered(3000, 24, 10, noise=1.5, seed=5)
    test, ytest = clustered(300, 24, 10, noise=1.5, seed=6)
    exact = knn_classify(train, ytrain, test, ytest, k=20)
    assert exact.recall is None and exact.index == "flat"
    ivf = knn_classify(train, ytrain, test, ytest, k=20, index=IndexSpec("ivf", nlist=32))
    hnsw = knn_classify(train, ytrain, test, ytest, k=20, index="hnsw")
    for approx in (ivf, hnsw):
        assert approx.recall["sample"] == 256 and list(approx.recall["at_k"]) == ["20"]
        assert approx.recall["at_k"]["20"] >= 0.95
        assert abs(approx.top1 - exact.top1) <= 2.0
    # 6 coarse PQ codes of 24-d vectors rank poorly: calibration re-scores more candidates exactly
    assert ivf.recall["refine_factor"] > 1 and ivf.recall["nprobe"] < 32
    given = knn_classify(train, ytrain, test, ytest, k=20, index=IndexSpec("ivf", nlist=32, nprobe=32))
    assert given.recall["refine_factor"] == 1 and given.recall["at_k"]["20"] < 0.95  # not calibrated
    # a single probe of many clusters misses neighbours, and the recall says so
    poor = knn_classify(train, ytrain, test, ytest, k=[5, 20], index=IndexSpec("ivf", nlist=64, nprobe=1))
    assert poor.recall["at_k"]["20"] < 0.95 and set(poor.recall["at_k"]) == {"5", "20"}


def embedded(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like real embeddings: class clusters in a 16-d latent space, mapped to ``dim``-d, plus noise."""
    g0 = torch.Generator().manual_seed(1)
    centers, projection = torch.randn(classes, 16, generator=g0), torch.randn(16, dim, generator=g0) / 4
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    latent = centers[labels] + torch.randn(n, 16, generator=g)
    return latent @ projection + 0.1 * torch.randn(n, dim, generator=g), labels


def test_ivf_calibration_reaches_the_recall_target() -> None:
    """Default nlist = sqrt(N) / 2; nprobe from nlist/8 x1.25^i, re-scoring 2^j x k candidates."""
    train, ytrain = embedded(20000, 128, 50, seed=3)
    test, ytest = embedded(1000, 128, 50, seed=4)
    exact = knn_classify(train, ytrain, test, ytest, k=[10, 50])
    ladder = [71 // 8]
    while ladder[-1] < 71:
        ladder.append(min(71, math.ceil(ladder[-1] * 1.25)))
    work = []
    for target in (0.95, 0.99):
        # recall@20 is what the target applies to, whether or not k=20 is asked for
        spec = IndexSpec("ivf", recall_target=target)
        report = knn_classify(train, ytrain, test, ytest, k=[10, 50], index=spec)
        measured = knn_classify(train, ytrain, test, ytest, k=[10, 20, 50], index=spec)
        r = report.recall
        assert r["nlist"] == default_nlist(20000) == 71
        assert r["nprobe"] in ladder and r["refine_factor"] in (1, 2, 4, 8, 16)
        assert measured.recall["at_k"]["20"] >= target
        assert {k: measured.recall["at_k"][k] for k in ("10", "50")} == r["at_k"]
        assert abs(report.top1 - exact.top1) <= (1.0 if target == 0.95 else 0.3)
        work.append(r["nprobe"] * r["refine_factor"])
    assert work[1] > work[0]  # a stricter target searches wider


def test_index_parameter_rules() -> None:
    assert [default_nlist(n) for n in (10, 1000, 100_000, 10**6)] == [1, 16, 158, 500]
    # PQ codes of at most 4 dimensions each, splitting d exactly
    assert [pq_codes(d) for d in (384, 768, 30, 7, 2)] == [96, 192, 10, 7, 1]
    with pytest.raises(UsageError, match="recall target"):
        IndexSpec("ivf", recall_target=1.5)
    with pytest.raises(UsageError, match="nprobe must be positive"):
        IndexSpec("ivf", nprobe=0)
    train, ytrain = clustered(10, 8, 2, noise=0.1, seed=9)
    with pytest.raises(UsageError, match="--index ivf needs at least 16 train features"):
        knn_classify(train, ytrain, train, ytrain, k=3, index="ivf")


def test_target_rank_is_the_position_in_the_ranking() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (500, 12), generator=g).float()  # many ties
    targets = torch.randint(0, 12, (500,), generator=g)
    ranking = ranked_classes(scores, 12)
    assert torch.equal(target_rank(scores, targets), (ranking == targets[:, None]).float().argmax(1))


def test_recall_at_k_counts_shared_indices() -> None:
    approx = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    exact = torch.tensor([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx((2 + 4) / 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dim", "train features are 8-dimensional but the val features are 6-dimensional"),
        ("unlabelled", "val set is unlabelled"),
        ("nan", "NaN or infinite"),
        ("k", "k=50 is larger than the train set (30 features)"),
        ("temperature", "temperature must be positive"),
    ],
)
def test_api_errors(change: str, message: str) -> None:
    train, ytrain = clustered(30, 8, 3, noise=0.5, seed=7)
    test, ytest = clustered(10, 8, 3, noise=0.5, seed=8)
    k, t = 10, 0.07
    if change == "dim":
        test = test[:, :6]
    elif change == "unlabelled":
        ytest = torch.full_like(ytest, -1)
    elif change == "nan":
        train[4, 2] = float("nan")
        message = "the train features hold NaN or infinite values (1 rows, the first is row 4)"
    elif change == "k":
        k = 50
    else:
        t = 0.0
    with pytest.raises(Exception) as info:
        knn_classify(train, ytrain, test, ytest, k=k, temperature=t)
    assert message in str(info.value)
    assert type(info.value).__name__ == "UsageError"


# -- files and the CLI ----------------------------------------------------------------------


def write_features(path: Path, n: int, dim: int, classes: int, seed: int, labelled: bool = True) -> Features:
    x, y = clustered(n, dim, classes, noise=1.5, seed=seed)
    names = [f"class_{i}" for i in range(classes)] if labelled else []
    feats = Features(x, y if labelled else torch.full_like(y, -1), names, [f"img_{i}.png" for i in range(n)])
    save_features(path, feats)
    return feats


def test_features_file_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    feats = write_features(tmp_path / "a.safetensors", 20, 8, 3, seed=9)
    back = load_features(tmp_path / "a.safetensors")
    assert torch.equal(back.features, feats.features) and back.features.dtype == torch.float32
    assert torch.equal(back.labels, feats.labels) and back.labels.dtype == torch.int64
    assert back.classes == feats.classes and back.paths == feats.paths
    save_features(tmp_path / "h.safetensors", feats, torch.float16)
    half = load_features(tmp_path / "h.safetensors")
    assert half.features.dtype == torch.float16
    assert torch.equal(half.features, feats.features.half())
    # large sets keep their paths in a sidecar file
    monkeypatch.setattr(features_io, "MAX_PATHS_IN_HEADER", 5)
    save_features(tmp_path / "big.safetensors", feats)
    sidecar = tmp_path / "big.safetensors.paths.txt"
    assert sidecar.read_text().splitlines() == feats.paths
    assert load_features(tmp_path / "big.safetensors").paths == feats.paths


def test_cli_table_json_and_per_class(tmp_path: Path, cli) -> None:
    train = write_features(tmp_path / "train.safetensors", 200, 16, 4, seed=10)
    val = write_features(tmp_path / "val.safetensors", 60, 16, 4, seed=11)
    out = tmp_path / "r.json"
    args = ["knn", "--train", str(tmp_path / "train.safetensors"), "--val", str(tmp_path / "val.safetensors")]
    result = cli.invoke(app, [*args, "-k", "3", "-k", "20", "-t", "0.07", "-t", "0.2", "--json", str(out), "--per-class"])
    assert result.exit_code == 0, result.output
    assert "top-1 %" in result.stdout and "class_3" in result.stdout
    data = json.loads(out.read_text())
    assert (data["num_train"], data["num_val"], data["num_classes"], data["index"]) == (200, 60, 4, "flat")
    assert [(r["k"], r["temperature"]) for r in data["results"]] == [(3, 0.07), (3, 0.2), (20, 0.07), (20, 0.2)]
    for row in data["results"]:
        top1, top5 = brute_force_knn(train.features, train.labels, val.features, val.labels, row["k"], row["temperature"], 4)
        assert row["top1"] == pytest.approx(top1) and f"{row['top1']:.2f}" in result.stdout
        assert row["top5"] is None  # 4 classes: every image would be in the top five
        # per-class top-1, averaged with the class sizes as weights, is the overall top-1
        sizes = torch.bincount(val.labels, minlength=4)
        per = [row["per_class"][f"class_{c}"] for c in range(4)]
        assert sum(p * int(s) for p, s in zip(per, sizes)) / 60 == pytest.approx(row["top1"])


def test_cli_default_ks_skip_those_above_the_train_set(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "train.safetensors", 50, 8, 3, seed=12)
    write_features(tmp_path / "val.safetensors", 10, 8, 3, seed=13)
    out = tmp_path / "r.json"
    result = cli.invoke(
        app, ["knn", "--train", str(tmp_path / "train.safetensors"), "--val", str(tmp_path / "val.safetensors"), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "skipped k=[100, 200]" in result.stderr
    assert [r["k"] for r in json.loads(out.read_text())["results"]] == [10, 20]


def test_cli_ivf_reports_recall(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "train.safetensors", 1000, 16, 5, seed=14)
    write_features(tmp_path / "val.safetensors", 100, 16, 5, seed=15)
    out = tmp_path / "r.json"
    args = ["knn", "--train", str(tmp_path / "train.safetensors"), "--val", str(tmp_path / "val.safetensors")]
    result = cli.invoke(app, [*args, "-k", "20", "--index", "ivf", "--nlist", "10", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    recall = data["recall"]
    assert data["index"] == "ivf" and (recall["sample"], recall["nlist"]) == (100, 10)
    assert recall["at_k"]["20"] >= 0.95  # nprobe and the re-scoring calibrated to the target
    line = f"recall of the ivf index against exact search on 100 val features: @20 {recall['at_k']['20']:.4f}"
    assert line in result.stdout


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("dim", [], "the train features are 16-dimensional but the val features are 8-dimensional"),
        ("unlabelled", [], "the val features are unlabelled"),
        ("nan", [], "the val features hold NaN or infinite values"),
        ("ok", ["-k", "500"], "k=500 is larger than the train set (100 features)"),
        ("ok", ["--index", "annoy"], "unknown index 'annoy'; choose one of flat, ivf, hnsw"),
        ("ok", ["--index", "ivf", "--nlist", "101"], "--nlist 101 is larger than the train set"),
        ("missing", [], "features file not found"),
        ("weights", [], "holds 1 other tensors, not features: give weights as --weights (with --train-data"),
        ("checkpoint", [], "val.safetensors is a PyTorch checkpoint, not a features file: give weights as --weights"),
        ("other_model", [], "extracted differently (different weights files (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb: "
                            "a.pth vs b.pth)); extract both with the same --weights and options"),
        ("other_blocks", [], "extracted differently (n last blocks 1 vs 4)"),
        ("other_seed", [], "extracted differently (seed 0 vs 1)"),
        ("other_init", [], "extracted differently (weights a.pth vs none)"),
        ("classes", [], "different classes"),
        ("ok", ["--json", "{folder}"], "is a folder; give a file name"),  # before the search, not after
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, cli, setup: str, args: list[str], message: str) -> None:
    train, val = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    write_features(train, 100, 16, 3, seed=16)
    if setup == "dim":
        write_features(val, 10, 8, 3, seed=17)
    elif setup == "unlabelled":
        write_features(val, 10, 16, 3, seed=17, labelled=False)
    elif setup == "nan":
        feats = write_features(val, 10, 16, 3, seed=17)
        feats.features[3] = float("inf")
        save_features(val, feats)
    elif setup == "weights":
        from safetensors.torch import save_file

        save_file({"pos_embed": torch.zeros(1, 5, 16)}, str(val))
    elif setup == "checkpoint":
        torch.save({"teacher": {"pos_embed": torch.zeros(1, 5, 16)}, "epoch": 3}, val)
    elif setup.startswith("other_"):
        first, second = {
            "other_model": ({"weights": "a.pth", "weights_sha256": "a" * 64}, {"weights": "b.pth", "weights_sha256": "b" * 64}),
            "other_blocks": ({"n_last_blocks": 1}, {"n_last_blocks": 4}),
            "other_seed": ({"weights": None, "seed": 0}, {"weights": None, "seed": 1}),
            "other_init": ({"weights": "a.pth", "weights_sha256": "a" * 64}, {"weights": None, "seed": 0}),
        }[setup]
        for path, meta, seed in ((train, first, 16), (val, second, 17)):
            feats = write_features(path, 100 if path == train else 10, 16, 3, seed=seed)
            feats.metadata = meta
            save_features(path, feats)
    elif setup == "classes":
        feats = write_features(val, 10, 16, 3, seed=17)
        feats.classes = ["cat", "dog", "eel"]
        save_features(val, feats)
    elif setup == "ok":
        write_features(val, 10, 16, 3, seed=17)
    args = [arg.replace("{folder}", str(tmp_path)) for arg in args]
    result = cli.invoke(app, ["knn", "--train", str(train), "--val", str(val), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_cli_warns_where_train_and_val_were_preprocessed_differently(tmp_path: Path, cli) -> None:
    train, val = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    same = {"weights": "a.pth", "weights_sha256": "a" * 64, "n_last_blocks": 1}
    for path, resize, seed in ((train, 256, 1), (val, 288, 2)):
        feats = write_features(path, 60, 16, 3, seed=seed)
        feats.metadata = {**same, "preprocessing": {"resize": resize, "crop_size": 224, "interpolation": "bicubic"}}
        save_features(path, feats)
    result = cli.invoke(app, ["knn", "--train", str(train), "--val", str(val), "-k", "5"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: the train and val features were preprocessed differently (resize 256 vs 288)\n"
    # the same preprocessing (and weights) says nothing
    result = cli.invoke(app, ["knn", "--train", str(train), "--val", str(train), "-k", "5"])
    assert "preprocessed differently" not in result.stderr


def test_cli_needs_a_complete_input_form(tmp_path: Path, cli) -> None:
    write_features(tmp_path / "t.safetensors", 20, 8, 2, seed=18)
    cases = [
        ([], "give --train and --val features files, or --weights with --train-data and --val-data"),
        (["--train", str(tmp_path / "t.safetensors")], "give both --train and --val"),
        (["--train", str(tmp_path / "t.safetensors"), "--train-data", str(tmp_path)], "give either --train/--val"),
        (["--train-data", str(tmp_path)], "give both --train-data and --val-data"),
    ]
    for args, message in cases:
        result = cli.invoke(app, ["knn", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


def test_installed_dino_knn_reports_errors_on_stderr(tmp_path: Path, run_dino) -> None:
    write_features(tmp_path / "train.safetensors", 30, 8, 3, seed=19)
    write_features(tmp_path / "val.safetensors", 10, 8, 3, seed=20)
    proc = run_dino("knn", "--train", str(tmp_path / "train.safetensors"), "--val", str(tmp_path / "val.safetensors"), "-k", "31")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: k=31 is larger than the train set (30 features)"


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        (["a", "b"], ["a", "b"], None),
        ([], ["a"], None),  # unlabelled features name no classes: nothing to compare
        (["a", "b"], ["a", "c"], "(2 vs 2: class 1 is 'b' in train and 'c' in val)"),
        (["a", "b"], ["a"], "(2 vs 1: only train has 'b')"),
        (["a"], ["a", "b", "c"], "(1 vs 3: only val has 'b')"),
    ],
)
def test_require_same_classes_names_the_first_difference(train, val, message):
    if message is None:
        features_io.require_same_classes(train, val)
    else:
        with pytest.raises(UsageError, match=re.escape(f"the train and val sets have different classes {message}")):
            features_io.require_same_classes(train, val)


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_one_step_form_compares_the_classes_before_loading_the_model(tmp_path: Path, cli, rgb_image, command) -> None:
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            rgb_image.save(tmp_path / split / name / "0.png")
    result = cli.invoke(app, [command, "--weights", str(tmp_path / "not-there.pth"), "--train-data",
                              str(tmp_path / "train"), "--val-data", str(tmp_path / "val")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: the train and val sets have different classes (2 vs 1: only train has 'dog')\n"


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_features_of_the_same_images_under_two_names_are_a_warning(tmp_path: Path, cli, command) -> None:
    args = ["-k", "5"] if command == "knn" else ["--epochs", "1", "--holdout", "0", "--lr", "0.1"]
    for name, data, seed in (("t", "/data/train", 3), ("again", "/data/train", 4), ("v", "/data/val", 5)):
        x, y = clustered(20, 8, 2, noise=1.5, seed=seed)
        save_features(tmp_path / f"{name}.safetensors", Features(x, y, ["a", "b"], metadata={"data": data}))
    same = cli.invoke(app, [command, "--train", str(tmp_path / "t.safetensors"), "--val",
                            str(tmp_path / "again.safetensors"), *args])  # fmt: skip
    assert same.exit_code == 0, same.output
    assert same.stderr.startswith("warning: --train and --val are features of the same images (/data/train): "
                                  "the accuracy is measured on the training images, not on held-out ones\n")
    other = cli.invoke(app, [command, "--train", str(tmp_path / "t.safetensors"), "--val",
                             str(tmp_path / "v.safetensors"), *args])  # fmt: skip
    assert other.exit_code == 0, other.output
    assert "warning" not in other.stderr


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_the_same_train_and_val_data_is_a_warning(tmp_path: Path, cli, command) -> None:
    write_features(tmp_path / "t.safetensors", 40, 8, 2, seed=3)
    write_features(tmp_path / "v.safetensors", 10, 8, 2, seed=4)
    args = ["-k", "5"] if command == "knn" else ["--epochs", "1", "--holdout", "0", "--lr", "0.1"]
    warning = "warning: --train and --val name the same data: the accuracy is measured on the training images"
    same = cli.invoke(app, [command, "--train", str(tmp_path / "t.safetensors"), "--val",
                            str(tmp_path / "." / "t.safetensors"), *args])  # fmt: skip
    assert same.exit_code == 0, same.output
    assert same.stderr.startswith(warning)
    other = cli.invoke(app, [command, "--train", str(tmp_path / "t.safetensors"), "--val",
                             str(tmp_path / "v.safetensors"), *args])  # fmt: skip
    assert other.exit_code == 0, other.output
    assert "warning" not in other.stderr
