"""Loading weights: reference layouts, dinocli checkpoints, safetensors, and refusing bad files."""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import random

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import dinocli
from dinocli.errors import DinoError, UsageError
from dinocli.weights import infer_backbone_spec, read_backbone_weights


@functools.lru_cache(maxsize=None)
def tiny_vit(patch_size: int = 16, img_size: int = 32, seed: int = 0):
    """A seeded vit_tiny (cached: tests only read it)."""
    torch.manual_seed(seed)
    return dinocli.create_backbone("vit_tiny", patch_size=patch_size, img_size=img_size).eval()


def head_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A DINOHead-like state dict (the entries that must be dropped from a backbone)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "mlp.0.weight": torch.randn(16, 192, generator=g),
        "mlp.0.bias": torch.randn(16, generator=g),
        "last_layer.weight_g": torch.ones(8, 1),
        "last_layer.weight_v": torch.randn(8, 16, generator=g),
    }


def same_weights(model, state_dict) -> bool:
    own = model.state_dict()
    return set(own) == set(state_dict) and all(torch.equal(own[k], state_dict[k]) for k in own)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# -- reference layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size, img_size", [(16, 32), (8, 32), (16, 224)])
def test_backbone_only_file_loads_strictly_and_infers_arch(tmp_path, patch_size, img_size):
    source = tiny_vit(patch_size, img_size)
    path = tmp_path / "dino_vittiny_pretrain.pth"
    torch.save(source.state_dict(), path)

    model = dinocli.load_backbone(path)
    assert not model.training
    assert model.patch_size == patch_size and model.embed_dim == 192
    assert model.pos_embed.shape[1] == 1 + (img_size // patch_size) ** 2
    assert same_weights(model, source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(X), source(X), rtol=0, atol=0)


def reference_training_checkpoint(teacher, student) -> dict:
    """The layout of the reference's ``checkpoint.pth``: DDP student, plain teacher, pickled args."""
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=8, lr=0.0005, epochs=100)
    return {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.head.{k}": v for k, v in head_tensors(1).items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            **{f"head.{k}": v for k, v in head_tensors(2).items()},
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 8)},
    }


def test_reference_training_checkpoint_with_namespace(tmp_path):
    teacher, student = tiny_vit(seed=1), tiny_vit(seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(reference_training_checkpoint(teacher, student), path)

    loaded_teacher = dinocli.load_backbone(path)
    assert same_weights(loaded_teacher, teacher.state_dict())
    assert not same_weights(loaded_teacher, student.state_dict())

    weights = read_backbone_weights(path, checkpoint_key="student")
    assert weights.state_dict.keys() == student.state_dict().keys()  # module.backbone. removed
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.state_dict.items())
    assert set(weights.head) == set(head_tensors(0))  # head.* split off, prefix removed
    assert torch.equal(weights.head["mlp.0.weight"], head_tensors(1)["mlp.0.weight"])
    assert isinstance(weights.metadata["args"], argparse.Namespace)
    assert weights.metadata["args"].arch == "vit_tiny" and weights.metadata["epoch"] == 3


def test_missing_checkpoint_key_lists_the_choices(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save(reference_training_checkpoint(tiny_vit(), tiny_vit()), path)
    with pytest.raises(UsageError, match=r"no 'ema' weights.*student, teacher.*--checkpoint-key"):
        dinocli.load_backbone(path, checkpoint_key="ema")


def test_student_of_a_file_with_one_network_is_an_error_not_the_teacher(tmp_path):
    model = tiny_vit()
    plain, tensors = tmp_path / "backbone.pth", tmp_path / "backbone.safetensors"
    torch.save(model.state_dict(), plain)
    save_file(dict(model.state_dict()), str(tensors))
    for path in (plain, tensors):
        assert same_weights(dinocli.load_backbone(path), model.state_dict())  # the default key: the one network
        with pytest.raises(UsageError, match=r"holds one network, not a training checkpoint .*drop --checkpoint-key student"):
            read_backbone_weights(path, checkpoint_key="student")


def test_dinocli_training_checkpoint_uses_its_backbone_spec(tmp_path):
    teacher, student = tiny_vit(8, 32, seed=1), tiny_vit(8, 32, seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": {
                **{f"backbone.{k}": v for k, v in student.state_dict().items()},
                **{f"head.{k}": v for k, v in head_tensors(1).items()},
            },
            "teacher": {
                **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                **{f"head.{k}": v for k, v in head_tensors(2).items()},
            },
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 2,
            "iteration": 20,
            "config": {"arch": "vit_tiny", "patch_size": 8, "out_dim": 8, "global_crop_size": 32},
            "strategy": {"center": torch.zeros(1, 8)},
            "dinocli.backbone": {"name": "vit_tiny", "kwargs": {"patch_size": 8, "img_size": 32}},
            "dinocli.version": "0.1.0",
        },
        path,
    )
    model = dinocli.load_backbone(path)
    assert model.patch_size == 8 and same_weights(model, teacher.state_dict())
    weights = read_backbone_weights(path, checkpoint_key="student")
    assert weights.spec == {"name": "vit_tiny", "kwargs": {"patch_size": 8, "img_size": 32}}
    assert weights.metadata["config"]["global_crop_size"] == 32
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.state_dict.items())
    assert weights.state_dict.keys() == student.state_dict().keys()


def test_safetensors_export_with_spec_and_plain(tmp_path):
    source = tiny_vit(8, 32)
    tensors = {k: v.contiguous() for k, v in source.state_dict().items()}
    with_spec = tmp_path / "export.safetensors"
    spec = {"name": "vit_tiny", "kwargs": {"patch_size": 8, "img_size": 32}}
    save_file(tensors, str(with_spec), metadata={"dinocli.backbone": json.dumps(spec)})
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))

    assert read_backbone_weights(with_spec).spec == spec
    assert read_backbone_weights(plain).spec is None
    for path in (with_spec, plain):
        model = dinocli.load_backbone(path)
        assert model.patch_size == 8 and same_weights(model, source.state_dict())


def test_resnet_state_dicts(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    # the reference's ResNet checkpoints: DDP prefix, classifier still present
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    model = dinocli.load_backbone(path)
    assert model.embed_dim == 512 and model.patch_size is None and not model.supports_attention
    assert "fc.weight" not in model.state_dict()
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model(X), net(X), rtol=0, atol=0)

    spec = infer_backbone_spec(torchvision.models.resnet50(weights=None).state_dict())
    assert spec == {"name": "resnet50", "kwargs": {"stem": "imagenet"}}


def test_small_stem_resnet_round_trips_through_a_file(tmp_path):
    small = dinocli.create_backbone("resnet18", img_size=32).eval()
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert dinocli.create_backbone("resnet18", img_size=64).conv1.kernel_size == (7, 7)
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)  # no metadata: the stem is read from conv1's shape
    loaded = dinocli.load_backbone(path)
    assert loaded.stem == "small"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    from dinocli.export import export_backbone

    exported = tmp_path / "small.safetensors"
    export_backbone(path, exported)  # the export's metadata carries the stem
    with torch.no_grad():
        torch.testing.assert_close(dinocli.load_backbone(exported)(x), small(x), rtol=0, atol=0)
    # a 32-px input keeps 4x4 positions before pooling with the small stem, 1x1 with ImageNet's
    with torch.no_grad():
        assert small.layer4(small.layer3(small.layer2(small.layer1(small.conv1(x))))).shape[-1] == 4


def test_conv_stem_vit_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    source = dinocli.create_backbone("vit_tiny", patch_size=4, img_size=32, patch_embed="conv")
    source.train()(torch.randn(8, 3, 32, 32))  # move the BatchNorm statistics off their start
    source.eval()
    path = tmp_path / "convstem.pth"
    torch.save(source.state_dict(), path)  # no metadata: the stem is read from the tensors
    assert infer_backbone_spec(source.state_dict()) == {
        "name": "vit_tiny", "kwargs": {"patch_size": 4, "img_size": 32, "patch_embed": "conv"}
    }
    loaded = dinocli.load_backbone(path)
    assert loaded.patch_embed.kind == "conv" and loaded.patch_size == 4
    # a 3x3 patch projection is not mistaken for a stem
    linear3 = dinocli.create_backbone("vit_tiny", patch_size=3, img_size=30).state_dict()
    assert infer_backbone_spec(linear3)["kwargs"] == {"patch_size": 3, "img_size": 30, "patch_embed": "linear"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), source(X), rtol=0, atol=0)


def test_shallower_vit_is_read_from_the_tensors(tmp_path):
    torch.manual_seed(0)
    source = dinocli.create_backbone("vit_tiny", patch_size=4, img_size=32, patch_embed="conv", depth=6).eval()
    path = tmp_path / "shallow.pth"
    torch.save(source.state_dict(), path)  # no metadata: the width names the architecture, the blocks its depth
    assert infer_backbone_spec(source.state_dict()) == {
        "name": "vit_tiny", "kwargs": {"patch_size": 4, "img_size": 32, "patch_embed": "conv", "depth": 6}
    }
    loaded = dinocli.load_backbone(path)
    assert len(loaded.blocks) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), source(X), rtol=0, atol=0)
    odd = dinocli.create_backbone("vit_tiny", patch_size=8, img_size=32).state_dict()
    odd["cls_token"] = torch.zeros(1, 1, 100)
    with pytest.raises(dinocli.UsageError, match="100 wide, 12 deep"):
        infer_backbone_spec(odd)


# -- errors ---------------------------------------------------------------------------------------


def test_architecture_mismatch_names_key_and_both_shapes(tmp_path):
    path = tmp_path / "vit_tiny.pth"
    torch.save(tiny_vit().state_dict(), path)
    with pytest.raises(UsageError) as info:
        dinocli.load_backbone(path, arch="vit_small")
    message = str(info.value)
    assert "'cls_token'" in message and "[1, 1, 192]" in message and "[1, 1, 384]" in message
    assert info.value.exit_code == 2

    # the first mismatching key, in the file's order: 2x2 patches in the file, 4x4 in the model
    pattern = r"'pos_embed' has shape \[1, 5, 192\] in the file but \[1, 17, 192\] in the model"
    with pytest.raises(UsageError, match=pattern):
        dinocli.load_backbone(path, patch_size=8, arch="vit_tiny")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_vit().state_dict()
    del sd["norm.weight"]
    sd["extra_token"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    pattern = r"missing keys \[norm\.weight\] \(1\); unexpected keys \[extra_token\] \(1\)"
    with pytest.raises(UsageError, match=pattern):
        dinocli.load_backbone(path)


def test_unknown_vit_width_asks_for_arch(tmp_path):
    sd = tiny_vit().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("blocks.5", "blocks.6", "blocks.7"))}
    path = tmp_path / "odd_depth.pth"
    torch.save(sd, path)
    with pytest.raises(UsageError, match="match no built-in ViT; pass --arch"):
        dinocli.load_backbone(path)


def test_raw_weights_of_a_plugin_backbone_load_with_arch(tmp_path):
    """A layout no built-in backbone has: ``arch`` alone names the network (example plugin)."""
    torch.manual_seed(1)
    model = dinocli.create_backbone("example_cnn").eval()
    path = tmp_path / "raw.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UsageError, match="cannot tell which backbone these weights belong to; pass --arch"):
        dinocli.load_backbone(path)
    loaded = dinocli.load_backbone(path, arch="example_cnn")
    assert same_weights(loaded, model.state_dict())
    assert torch.equal(loaded(X), model(X))


def test_weights_naming_a_backbone_no_plugin_provides_say_so(tmp_path):
    path = tmp_path / "from_a_plugin.safetensors"
    save_file(
        tiny_vit().state_dict(), str(path),
        metadata={"dinocli.backbone": json.dumps({"name": "gone_net", "kwargs": {}})},
    )
    with pytest.raises(UsageError) as caught:
        dinocli.load_backbone(path)
    assert str(caught.value) == (
        "these weights were saved from backbone 'gone_net', which no installed plugin provides; "
        "install the plugin that provides it (see 'dino plugins')"
    )


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    # control: the payload really runs code when unpickled without restrictions
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(str(control))))
    assert control.is_dir()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    sd = tiny_vit().state_dict()
    torch.save({"teacher": sd, "args": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(DinoError, match=r"refusing to load .*evil\.pth.*mkdir.*could run code") as info:
        dinocli.load_backbone(path)
    assert info.value.exit_code == 1
    assert not marker.exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    data = random.Random(0).randbytes(4096)
    assert data[8:9] != b"{"  # not mistaken for a safetensors header
    path = tmp_path / "noise.pth"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=r"noise\.pth is not a .*PyTorch checkpoint") as info:
        dinocli.load_backbone(path)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"cut\.safetensors is not a valid safetensors file"):
        dinocli.load_backbone(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UsageError, match=r"weights file not found: .*nowhere\.pth"):
        dinocli.load_backbone(tmp_path / "nowhere.pth")
    with pytest.raises(UsageError, match="is a folder, not a weights file"):
        dinocli.load_backbone(tmp_path)


def test_a_tensor_file_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UsageError, match="holds a Tensor, not a state dict or checkpoint"):
        dinocli.load_backbone(path)


def test_an_odd_pickle_protocol_is_one_error_and_no_warning(tmp_path):
    import warnings

    path = tmp_path / "odd.pth"
    path.write_bytes(b"\x80\xec" + bytes(40))  # pickle protocol 236: torch.load warns, then fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="not a PyTorch checkpoint dinocli can read"):
            read_backbone_weights(path)
    assert [str(w.message) for w in caught] == []
