"""Train through the Python API, then evaluate the teacher by k-NN.

    python examples/train_api.py IMAGE_DIR RUN_DIR [EPOCHS]

IMAGE_DIR may be an ImageFolder tree with train/ and val/ (then k-NN accuracy is printed) or any
folder of images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dinocli
from dinocli.evaluate import extract_folder, knn_features
from dinocli.train import pretrain, resolve_config


def main(data: str, output: str, epochs: int = 5) -> None:
    root = Path(data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    cfg = resolve_config(
        Path(__file__).with_name("small_images_32px.toml"),
        {"data": str(train_dir), "output": output, "epochs": epochs},
    )
    result = pretrain(cfg)
    print(f"trained {result.epochs} epochs; checkpoint {result.checkpoint}")
    if (root / "val").is_dir():
        model = dinocli.load_backbone(result.checkpoint)
        size = cfg.global_crop_size
        train = extract_folder(model, train_dir, resize=size, crop_size=size)
        val = extract_folder(model, root / "val", resize=size, crop_size=size)
        print(f"teacher k-NN top-1 (k=20): {knn_features(train, val, k=20).top1:.1f} %")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5)
