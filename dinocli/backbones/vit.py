"""Vision Transformer with the reference implementation's state-dict layout and numerics.

Keys match the backbones released with the DINO paper (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``), so
those load with strict key checking. ``patch_embed="conv"`` replaces the patch projection by a
convolutional stem (keys ``patch_embed.proj.{i}``, see :func:`conv_stem`). The forward pass uses
fused attention (:func:`torch.nn.functional.scaled_dot_product_attention`), except in bf16/fp16 on
the CPU, where PyTorch's fused kernel is slower than two matrix products (see :func:`attend`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dinocli
from dinocli.distributed import keep_mask
from dinocli.errors import UsageError

#: name -> (embed_dim, depth, num_heads), as in the reference implementation.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescaling the kept ones.

    The mask comes from :func:`dinocli.distributed.keep_mask`: during training it is drawn per
    sample of the global batch, so it does not depend on the number of processes.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = keep_mask(x.shape[0], keep, x).view((x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask / keep


def add_dropped_path(x: torch.Tensor, branch: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """``x + drop_path(branch)`` (the same mask) in one pass over the activations instead of
    three: ``x + branch * mask * (1 / keep)`` in the operation's float32 arithmetic, rounded once
    where the separate bf16 operations round three times; gradients as :func:`drop_path`'s
    (:class:`_AddDropped`). Compiled code, and ``x`` and ``branch`` of different dtypes or
    shapes, take the plain expression (the compiler fuses it itself).
    """
    if drop_prob == 0.0 or not training:
        return x + branch
    if torch.compiler.is_compiling() or branch.shape != x.shape or branch.dtype != x.dtype:
        return x + drop_path(branch, drop_prob, training)
    keep = 1.0 - drop_prob
    mask = keep_mask(x.shape[0], keep, x).view((x.shape[0],) + (1,) * (x.ndim - 1))
    return _AddDropped.apply(x, branch, mask, keep)


class _AddDropped(torch.autograd.Function):
    """``x + branch * mask / keep``: one ``addcmul`` forward; backward ``grad`` for ``x`` and
    ``grad * mask / keep`` for ``branch`` (what the separate operations give). ``mask``: 0 or 1
    per sample, in the dtype of ``x`` (a mixed-dtype ``addcmul`` is several times slower on CPUs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, branch: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.keep = keep
        return torch.addcmul(x, branch, mask, value=1.0 / keep)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad, grad.mul(mask).div_(ctx.keep), None, None


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def add(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + self(branch)``, fused (:func:`add_dropped_path`)."""
        return add_dropped_path(x, branch, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        out = attend(q, k, v, self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit softmax attention ``[B, heads, N, N]``."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v``, fused where that is fastest.

    On the CPU in bf16/fp16, PyTorch's fused kernel runs at fp32 speed forward and several times
    slower backward (ViT-Tiny/4 at 32 px, batch 64: 48 ms against 9 ms per block for forward and
    backward), so there the two matrix products are written out, in the low-precision dtype.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path_rate: float
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (a scripted copy takes the plain expression)
            if isinstance(self.drop_path, DropPath):  # one fused multiply-add per residual
                x = self.drop_path.add(x, self.attn(self.norm1(x)))
                return self.drop_path.add(x, self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


#: Patch embeddings: ``linear`` (the reference's) or ``conv`` (a convolutional stem).
PATCH_EMBEDS = ("linear", "conv")


def conv_stem(patch_size: int, in_chans: int, embed_dim: int) -> nn.Sequential:
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): ``log2(patch_size)``
    3x3 stride-2 convolutions with BatchNorm and ReLU, from ``embed_dim / 8`` channels doubling at
    each step (at most ``embed_dim``), then a 1x1 convolution to ``embed_dim``; the same token grid
    as a ``patch_size`` projection."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << steps != patch_size:
        raise UsageError(
            f"--patch-embed conv needs a power-of-two patch size (2, 4, 8, 16), got {patch_size}"
        )
    layers: list[nn.Module] = []
    width = in_chans
    for step in range(steps):
        out = min(embed_dim, max(1, embed_dim // 8) << step)
        conv = nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        width = out
    layers.append(nn.Conv2d(width, embed_dim, kernel_size=1))
    return nn.Sequential(*layers)


def require_whole_patch(h: int, w: int, patch_size: int) -> None:
    """A one-line error for an ``h x w`` crop smaller than one ViT patch, which has no token."""
    if h < patch_size or w < patch_size:
        raise UsageError(
            f"a {h}x{w} crop is smaller than one {patch_size}-pixel ViT patch: "
            "use a larger crop size or a smaller --patch-size"
        )


class PatchEmbed(nn.Module):
    """Image to patch tokens: one ``patch_size`` convolution (``linear``) or a :func:`conv_stem`."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in PATCH_EMBEDS:
            choices = ", ".join(PATCH_EMBEDS)
            raise UsageError(f"unknown patch embedding {kind!r}; choose one of {choices}")
        self.patch_size = patch_size
        self.kind = kind
        if kind == "linear":
            self.proj: nn.Module = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        else:
            self.proj = conv_stem(patch_size, in_chans, embed_dim)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """The token grid ``[B, embed_dim, H // patch, W // patch]``."""
        h, w = x.shape[-2], x.shape[-1]
        require_whole_patch(h, w, self.patch_size)
        if self.kind == "conv":  # drop the remainder, as the patch projection does
            x = x[..., : h - h % self.patch_size, : w - w % self.patch_size]
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x).flatten(2).transpose(1, 2)


#: What a ViT returns: the CLS token (the reference's) or the mean patch token (global average).
POOLS = ("cls", "avg")


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """The embedding ``[B, D]`` of normed tokens ``[B, 1 + N, D]``: CLS (``cls``) or mean patch (``avg``)."""
    return tokens[:, 1:].mean(dim=1) if pool == "avg" else tokens[:, 0]


class VisionTransformer(nn.Module):
    """ViT returning the CLS token (``pool="cls"``) or the mean patch token (``pool="avg"``) after
    the final norm, ``[B, embed_dim]``."""

    supports_attention = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        patch_embed: str = "linear",
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise UsageError(f"unknown ViT pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.img_size = img_size
        self.pool = pool
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_embed)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, npatch: int, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h x w`` input, as the reference computes them."""
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos = self.pos_embed[:, :1]
        patch_pos = self.pos_embed[:, 1:]
        dim = self.pos_embed.shape[-1]
        side = int(math.sqrt(N))
        # The reference adds 0.1 to avoid floating-point error in the scale factor.
        h0 = h // self.patch_size + 0.1
        w0 = w // self.patch_size + 0.1
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)),
            mode="bicubic",
        )
        if (patch_pos.shape[-2], patch_pos.shape[-1]) != (int(h0), int(w0)):
            raise RuntimeError("position-embedding interpolation gave the wrong grid size")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the CLS token prepended and position embeddings added."""
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)
        if not torch.jit.is_scripting():
            x = _to_autocast_dtype(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + N, embed_dim]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.forward_features(x), self.pool)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention probabilities, ``[B, heads, 1 + N, 1 + N]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The normed token outputs ``[B, 1 + N, D]`` of the last ``n`` blocks."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs


def _to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """Keep the residual stream in the autocast dtype: otherwise every linear layer casts its input
    from fp32 again, and on CPUs the casts cost more than bf16 saves. A no-op outside autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _factory(arch: str):
    embed_dim, arch_depth, num_heads = VIT_ARCHS[arch]

    def build(
        patch_size: int = 16,
        drop_path_rate: float = 0.0,
        img_size: int = 224,
        patch_embed: str = "linear",
        pool: str = "cls",
        depth: int | None = None,
        **_: Any,
    ) -> VisionTransformer:
        if patch_size < 1:
            raise UsageError(f"--patch-size must be positive, got {patch_size}")
        # The position embeddings are sized for the training crop, rounded to whole patches.
        img_size = max(patch_size, img_size - img_size % patch_size)
        if depth is not None and depth < 1:
            raise UsageError(f"a ViT needs at least one block, got depth {depth}")
        return VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=arch_depth if depth is None else depth,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            patch_embed=patch_embed,
            pool=pool,
        )

    return build


@dinocli.hookimpl
def dinocli_register_backbones(register) -> None:
    for arch, (dim, depth, heads) in VIT_ARCHS.items():
        register(arch, _factory(arch), description=f"ViT {dim} wide, {depth} deep, {heads} heads")
