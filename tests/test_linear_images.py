"""The reference linear evaluation on augmented images, against a plain loop of eval_linear.py's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import transforms

from conftest import make_rgb_image
from dinocli.data import image_folder, open_rgb
from dinocli.errors import UsageError
from dinocli.evaluate import backbone_for_eval, extract_folder
from dinocli.evaluate.linear_images import linear_reference_images


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/{a,b,c}: 7 images each; val/{a,b,c}: 2 each; 40x36 pixels."""
    root = tmp_path_factory.mktemp("linear_images")
    seed = 0
    for split, count in (("train", 7), ("val", 2)):
        for cls in "abc":
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                make_rgb_image(40, 36, seed).save(root / split / cls / f"{i}.png")
                seed += 1
    return root


def tiny_vit() -> torch.nn.Module:
    return backbone_for_eval(random_init=True, arch="vit_tiny", patch_size=8, img_size=32, depth=2)[0]


def plain_eval_linear(model, root: Path, val_x, val_y, lr, epochs, batch_size, seed, n_last_blocks):
    """eval_linear.py's loop written out: sampler order, per-image augmentation, SGD + cosine."""
    paths, labels, _ = image_folder(root)
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(32),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    torch.manual_seed(seed)
    layer = torch.nn.Linear(val_x.shape[1], 3)
    layer.weight.data = torch.empty(3, val_x.shape[1]).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
    layer.bias.data.zero_()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(layer.parameters(), lr * batch_size / 256.0, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    accs = []
    for epoch in range(epochs):
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = torch.stack([augment(open_rgb(paths[i])) for i in idx])
            with torch.no_grad():
                out = model.get_intermediate_layers(x, n_last_blocks)
                feats = torch.cat([t[:, 0] for t in out], dim=-1)
            loss = torch.nn.CrossEntropyLoss()(layer(feats), torch.tensor([labels[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            accs.append(100.0 * float((layer(val_x).argmax(1) == val_y).float().mean()))
    return layer, accs


def test_reference_mode_equals_a_plain_eval_linear_loop(tiny_set: Path) -> None:
    model = tiny_vit()
    val = extract_folder(model, tiny_set / "val", resize=37, crop_size=32, n_last_blocks=2)
    paths, labels, classes = image_folder(tiny_set / "train")
    options = dict(lr=2.0, epochs=3, batch_size=8, seed=5)
    report = linear_reference_images(
        model, paths, labels, val, classes=classes, crop_size=32, n_last_blocks=2,
        precision="fp32", device="cpu", **options,
    )  # fmt: skip
    layer, accs = plain_eval_linear(model, tiny_set / "train", val.features, val.labels, n_last_blocks=2, **options)
    torch.testing.assert_close(report.classifier.weight, layer.weight.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(report.classifier.bias, layer.bias.detach(), rtol=1e-4, atol=1e-6)
    assert [h.top1 for h in report.history] == pytest.approx(accs)
    assert report.best_top1 == pytest.approx(max(accs)) and report.top1 == pytest.approx(accs[-1])
    assert report.classifier.metadata["augmented"] is True and report.classifier.classes == ["a", "b", "c"]
    assert report.classifier.metadata["features"]["n_last_blocks"] == 2


def test_reference_mode_errors(tiny_set: Path) -> None:
    model = tiny_vit()
    val = extract_folder(model, tiny_set / "val", resize=37, crop_size=32)
    paths, labels, classes = image_folder(tiny_set / "train")
    with pytest.raises(UsageError, match="train set is unlabelled"):
        linear_reference_images(model, paths, [-1] * len(paths), val, crop_size=32, epochs=1, device="cpu")
    with pytest.raises(UsageError, match="no images"):
        linear_reference_images(model, [], [], val, crop_size=32, epochs=1, device="cpu")
    with pytest.raises(UsageError, match="at least 2"):
        linear_reference_images(model, paths, [0] * len(paths), val, crop_size=32, epochs=1, device="cpu")
    with pytest.raises(UsageError, match="val-every"):
        linear_reference_images(model, paths, labels, val, crop_size=32, epochs=1, device="cpu", val_every=0)
