"""dinocli's ViT against an independent, plain re-computation of the reference forward pass.

The reference (facebookresearch/dino, ``vision_transformer.py``) computes attention explicitly as
``softmax(q @ k^T * head_dim**-0.5) @ v`` and interpolates the position embeddings bicubically with
the scale factors ``(w0 + 0.1) / sqrt(N)`` and ``(h0 + 0.1) / sqrt(N)``. The functions below redo
that from the state dict alone with functional ops, so they share no code with dinocli.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dinocli
from dinocli.backbones.vit import VIT_ARCHS, add_dropped_path, attend, drop_path

ARCH = "vit_tiny"
HEADS = VIT_ARCHS[ARCH][2]


# -- the independent reference ---------------------------------------------------------------


def ref_interpolate_pos_encoding(pos_embed, tokens, w, h, patch):
    """Reference interpolation; like the reference, ``w`` is the size of dim 2 and ``h`` of dim 3."""
    npatch = tokens.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    dim = tokens.shape[-1]
    w0 = w // patch + 0.1
    h0 = h // patch + 0.1
    side = int(math.sqrt(N))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert (grid.shape[-2], grid.shape[-1]) == (int(w0), int(h0))
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def ref_attention(sd, prefix, x, heads):
    B, N, C = x.shape
    qkv = F.linear(x, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"]), attn


def ref_norm(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-6)


def ref_run(sd, x, patch, heads=HEADS):
    """Returns (normed outputs of every block, last block's attention)."""
    _, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), t), dim=1)
    t = t + ref_interpolate_pos_encoding(sd["pos_embed"], t, w, h, patch)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    outputs, attn = [], None
    for i in range(depth):
        p = f"blocks.{i}."
        y, attn = ref_attention(sd, p + "attn.", ref_norm(sd, p + "norm1.", t), heads)
        t = t + y
        normed = ref_norm(sd, p + "norm2.", t)
        hidden = F.gelu(F.linear(normed, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        outputs.append(ref_norm(sd, "norm.", t))
    return outputs, attn


def reference_key_list(depth: int) -> list[str]:
    """The state-dict keys of the reference's released ViT backbones, in order."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return keys + ["norm.weight", "norm.bias"]


# -- helpers ------------------------------------------------------------------------------------


def randomized_vit(patch_size: int, img_size: int = 224, drop_path_rate: float = 0.0, seed: int = 0):
    """A vit_tiny whose every tensor is random and far from its init, so that all terms matter."""
    model = dinocli.create_backbone(
        ARCH, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name in ("pos_embed", "cls_token"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def image_batch(h: int, w: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch_size, img_size, size",
    [(16, 224, (224, 224)), (16, 224, (160, 256)), (8, 112, (112, 112)), (8, 112, (80, 128))],
    ids=["p16-224x224", "p16-160x256", "p8-112x112", "p8-80x128"],
)
def test_forward_matches_reference(patch_size, img_size, size):
    model = randomized_vit(patch_size, img_size)
    x = image_batch(*size)
    expected, _ = ref_run(model.state_dict(), x, patch_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, VIT_ARCHS[ARCH][0])
    assert_rel_close(out, expected[-1][:, 0])
    # the outputs are not degenerate: samples differ and the embedding is not constant
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_position_interpolation_is_bicubic_with_reference_scale():
    model = randomized_vit(16)
    pos = model.pos_embed.detach()
    tokens = torch.zeros(1, 1 + 10 * 16, pos.shape[-1])
    expected = ref_interpolate_pos_encoding(pos, tokens, 160, 256, 16)
    with torch.no_grad():
        got = model.interpolate_pos_encoding(10 * 16, 160, 256)
    assert got.shape == (1, 1 + 160, pos.shape[-1])
    assert_rel_close(got, expected, rel=1e-6)
    # the choice matters: bilinear resizing, or the scale factor without the 0.1, give other numbers
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    bilinear = F.interpolate(grid, size=(10, 16), mode="bilinear")
    bilinear = bilinear.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    assert (bilinear - got[:, 1:]).abs().max() > 1e-3
    # same size, same aspect ratio: the position embeddings are used as they are
    with torch.no_grad():
        assert torch.equal(model.interpolate_pos_encoding(196, 224, 224), model.pos_embed)


def test_last_selfattention_is_the_explicit_softmax():
    model = randomized_vit(16)
    x = image_batch(160, 256)
    _, expected = ref_run(model.state_dict(), x, 16)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
    n_tokens = 1 + (160 // 16) * (256 // 16)
    assert attn.shape == (2, HEADS, n_tokens, n_tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, HEADS, n_tokens), rtol=0, atol=1e-5)
    assert_rel_close(attn, expected)
    # not uniform: the random weights give a peaked attention somewhere
    assert attn.max() > 5.0 / n_tokens


def test_forward_uses_fused_attention(monkeypatch):
    model = randomized_vit(16, img_size=64)
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(image_batch(64, 64))
    assert len(calls) == VIT_ARCHS[ARCH][1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu_attention_is_explicit_and_accurate(monkeypatch, dtype):
    def fail(*args, **kwargs):
        raise AssertionError("the fused kernel is slow in low precision on the CPU")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", fail)
    got = attend(q.to(dtype), k.to(dtype), v.to(dtype), 0.25)
    assert got.dtype == dtype
    err = (got.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert err.max() < 0.03  # a few bf16 roundings (eps 2^-8) per output
    q32, k32, v32 = q.float().requires_grad_(), k.float(), v.float()
    qb = q32.detach().to(dtype).requires_grad_()
    (attend(qb, k32.to(dtype), v32.to(dtype), 0.25).float() * v32[..., :1]).sum().backward()
    ((((q32 @ k32.transpose(-2, -1)) * 0.25).softmax(-1) @ v32) * v32[..., :1]).sum().backward()
    cos = F.cosine_similarity(qb.grad.float().flatten(), q32.grad.flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("n", [1, 3])
def test_intermediate_layers(n):
    model = randomized_vit(8, img_size=64)
    x = image_batch(48, 64)
    expected, _ = ref_run(model.state_dict(), x, 8)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n)
        cls = model(x)
    assert len(layers) == n
    for got, want in zip(layers, expected[-n:]):
        assert got.shape == (2, 1 + 6 * 8, VIT_ARCHS[ARCH][0])
        assert_rel_close(got, want)
    assert_rel_close(layers[-1][:, 0], cls)


def test_drop_path_only_in_train_mode():
    model = randomized_vit(16, img_size=64, drop_path_rate=0.5)
    x = image_batch(64, 64, batch=4)
    expected, _ = ref_run(model.state_dict(), x, 16)
    with torch.no_grad():
        eval_a, eval_b = model(x), model(x)
        model.train()
        torch.manual_seed(0)
        train_a = model(x)
        torch.manual_seed(1)
        train_b = model(x)
    assert torch.equal(eval_a, eval_b)
    assert_rel_close(eval_a, expected[-1][:, 0])
    assert (train_a - eval_a).abs().max() > 1e-3
    assert (train_a - train_b).abs().max() > 1e-3

    no_drop = randomized_vit(16, img_size=64, drop_path_rate=0.0).train()
    with torch.no_grad():
        assert torch.equal(no_drop(x), no_drop.eval()(x))


def test_drop_path_drops_whole_samples_and_rescales():
    x = torch.ones(4000, 5, 3)
    torch.manual_seed(0)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.reshape(4000, -1)
    kept = per_sample[:, 0] != 0
    # each sample is either dropped entirely or kept and scaled by 1 / keep_prob
    assert torch.all(per_sample[~kept] == 0)
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_is_x_plus_drop_path_of_the_branch_rounded_once(dtype):
    """``add_dropped_path``: the same samples dropped as ``drop_path``; values against the float64
    formula, rounded once (the separate bf16 operations round three times); gradients exactly
    those of ``x + drop_path(branch)``."""
    g = torch.Generator().manual_seed(0)
    x, branch, grad = (torch.randn(64, 7, 24, generator=g).to(dtype) for _ in range(3))
    outputs, grads = {}, {}
    for name, fn in (("fused", add_dropped_path), ("plain", lambda a, b, p, t: a + drop_path(b, p, t))):
        inputs = (x.clone().requires_grad_(True), branch.clone().requires_grad_(True))
        torch.manual_seed(3)
        outputs[name] = fn(*inputs, 0.25, True)
        grads[name] = torch.autograd.grad(outputs[name], inputs, grad)
    torch.manual_seed(3)
    mask = (drop_path(torch.ones(64), 0.25, training=True) != 0).double().view(64, 1, 1)
    assert 0 < mask.sum() < 64
    expected = x.double() + branch.double() * mask / 0.75
    out = outputs["fused"]
    assert out.dtype == dtype
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6  # a unit in the last place: one rounding
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-6)
    for fused, plain in zip(grads["fused"], grads["plain"]):
        assert fused.dtype == dtype and torch.equal(fused, plain)
    torch.testing.assert_close(grads["fused"][1].double(), grad.double() * mask / 0.75, rtol=rtol, atol=1e-6)
    error, plain_error = ((outputs[k].double() - expected).abs().mean() for k in ("fused", "plain"))
    if dtype == torch.bfloat16:  # rounded once instead of three times: closer
        assert error < 0.8 * plain_error
    assert torch.equal(add_dropped_path(x, branch, 0.25, training=False), x + branch)
    assert torch.equal(add_dropped_path(x, branch, 0.0, training=True), x + branch)


@pytest.mark.parametrize("arch", list(VIT_ARCHS))
def test_state_dict_keys_are_the_reference_list(arch):
    dim, depth, heads = VIT_ARCHS[arch]
    model = dinocli.create_backbone(arch, patch_size=16)
    sd = model.state_dict()
    assert list(sd) == reference_key_list(depth)
    assert sd["pos_embed"].shape == (1, 197, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert model.blocks[0].attn.num_heads == heads
    assert model.embed_dim == dim and model.patch_size == 16 and model.supports_attention
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


def test_patch_size_8_grid():
    model = dinocli.create_backbone(ARCH, patch_size=8, img_size=224)
    assert model.pos_embed.shape == (1, 1 + 28 * 28, 192)
    assert model.patch_embed.proj.weight.shape == (192, 3, 8, 8)


@pytest.mark.parametrize("patch_size, widths", [(4, [24, 48]), (16, [24, 48, 96, 192]), (2, [24])])
def test_conv_patch_embed_is_a_stem_of_stride_2_convolutions(patch_size, widths):
    model = dinocli.create_backbone(ARCH, patch_size=patch_size, img_size=32, patch_embed="conv").eval()
    convs = [m for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:-1]] == widths  # embed_dim / 8, doubling, as Xiao et al.
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 192
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.patch_embed.proj) == len(widths)
    linear = dinocli.create_backbone(ARCH, patch_size=patch_size, img_size=32).eval()
    for size in (32, 32 + patch_size - 1, 48):  # the same grid as the patch projection, remainder dropped
        x = torch.randn(2, 3, size, size)
        assert model.patch_embed(x).shape == linear.patch_embed(x).shape
        assert model(x).shape == (2, 192)
    # keys: the stem's layers under patch_embed.proj, everything after it as the reference
    keys = list(model.state_dict())
    assert keys[:2] == ["cls_token", "pos_embed"] and "patch_embed.proj.weight" not in keys
    assert keys[2] == "patch_embed.proj.0.weight" and keys[-2:] == ["norm.weight", "norm.bias"]


def test_conv_patch_embed_needs_a_power_of_two_patch():
    from dinocli.errors import UsageError

    with pytest.raises(UsageError, match="power-of-two patch size"):
        dinocli.create_backbone(ARCH, patch_size=6, img_size=36, patch_embed="conv")
    with pytest.raises(UsageError, match="unknown patch embedding 'conv3'"):
        dinocli.create_backbone(ARCH, patch_size=4, img_size=32, patch_embed="conv3")


@pytest.mark.parametrize("patch_embed", ["linear", "conv"])
def test_a_crop_smaller_than_one_patch_is_a_usage_error(patch_embed):
    from dinocli.errors import UsageError

    model = dinocli.create_backbone(ARCH, patch_size=16, img_size=32, patch_embed=patch_embed).eval()
    with torch.no_grad():
        assert model(image_batch(16, 40)).shape == (2, 192)  # one row of patches is enough
        for h, w in [(15, 40), (40, 8)]:
            with pytest.raises(UsageError, match=f"a {h}x{w} crop is smaller than one 16-pixel ViT patch"):
                model(image_batch(h, w))
    with pytest.raises(UsageError, match="--patch-size must be positive, got 0"):
        dinocli.create_backbone(ARCH, patch_size=0)


def test_avg_pool_returns_the_mean_normed_patch_token_with_the_same_keys():
    model = randomized_vit(8, img_size=32)
    avg = dinocli.create_backbone(ARCH, patch_size=8, img_size=32, pool="avg").eval()
    assert list(avg.state_dict()) == list(model.state_dict())  # no extra tensors
    avg.load_state_dict(model.state_dict())
    for h, w in [(32, 32), (16, 24)]:
        x = image_batch(h, w)
        outputs, _ = ref_run(model.state_dict(), x, 8)
        with torch.no_grad():
            assert_rel_close(avg(x), outputs[-1][:, 1:].mean(dim=1))
            assert_rel_close(model(x), outputs[-1][:, 0])


def test_depth_sets_the_number_of_blocks_and_keeps_the_reference_keys():
    shallow = dinocli.create_backbone(ARCH, patch_size=8, img_size=32, depth=3)
    assert len(shallow.blocks) == 3 and shallow.embed_dim == 192
    assert len(dinocli.create_backbone(ARCH, patch_size=8, img_size=32).blocks) == 12
    assert len(dinocli.create_backbone(ARCH, patch_size=8, img_size=32, depth=None).blocks) == 12
    keys = set(shallow.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("blocks.")} == {"0", "1", "2"}
    deep = set(dinocli.create_backbone(ARCH, patch_size=8, img_size=32).state_dict())
    assert keys < deep  # the first blocks of the full network, under the same names
    with pytest.raises(dinocli.UsageError, match="at least one block"):
        dinocli.create_backbone(ARCH, patch_size=8, img_size=32, depth=-2)


def test_unknown_pool_is_a_usage_error():
    with pytest.raises(dinocli.UsageError, match="unknown ViT pooling 'max'; choose one of cls, avg"):
        dinocli.create_backbone(ARCH, patch_size=8, img_size=32, pool="max")
