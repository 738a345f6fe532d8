"""Evaluating frozen features: extraction (``dino extract``), weighted k-NN (``dino knn``) and
linear evaluation (``dino linear``).

Reusable from Python, e.g. for k-NN monitoring during training::

    from dinocli.evaluate import extract_folder, knn_features
    train = extract_folder(model, "data/train", resize=32, crop_size=32)
    val = extract_folder(model, "data/val", resize=32, crop_size=32)
    print(knn_features(train, val, k=20).top1)
"""

from dinocli.evaluate.extract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_for_eval,
    embed,
    eval_transform,
    extract_features,
    extract_folder,
    matched_eval_size,
    reference_resize,
)
from dinocli.evaluate.features_io import Features, load_features, save_features
from dinocli.evaluate.knn import (
    DEFAULT_KS,
    DEFAULT_TEMPERATURE,
    IndexSpec,
    KnnReport,
    KnnResult,
    knn_classify,
    knn_features,
    ranked_classes,
    weighted_vote,
)
from dinocli.evaluate.linear import (
    LinearClassifier,
    LinearReport,
    linear_reference,
    load_classifier,
    save_classifier,
)
from dinocli.evaluate.linear_sweep import DEFAULT_LRS, linear_sweep

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_LRS",
    "DEFAULT_TEMPERATURE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Features",
    "IndexSpec",
    "KnnReport",
    "KnnResult",
    "LinearClassifier",
    "LinearReport",
    "embed",
    "eval_transform",
    "extract_features",
    "extract_folder",
    "backbone_for_eval",
    "knn_classify",
    "knn_features",
    "linear_reference",
    "linear_sweep",
    "load_classifier",
    "load_features",
    "matched_eval_size",
    "ranked_classes",
    "reference_resize",
    "save_classifier",
    "save_features",
    "weighted_vote",
]
