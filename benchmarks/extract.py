"""Benchmark: images/s of ``dino extract``'s model forward against a reference-style forward.

The reference ViT computes attention explicitly (``softmax(q k^T) v``) in fp32; dinocli's uses
fused attention and, with ``--precision bf16``, autocast. Both run the same weights on the same
random batch in one process; the script prints images/s, the ratios, and the cosine similarity of
the bf16 features to the fp32 ones. It also times the model's largest matrix product (``mlp.fc1`` on
the batch's tokens) in fp32 and bf16: their ratio is the most bf16 can gain on this machine.

    python benchmarks/extract.py                         # vit_small/16, 224 px, on CUDA if present
    python benchmarks/extract.py --device cpu --batch-size 8 --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dinocli import create_backbone
from dinocli.evaluate.extract import autocast, embed, resolve_device


@torch.no_grad()
def reference_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS embedding with explicit attention, as the reference ViT computes it (written anew)."""
    x = model.prepare_tokens(x)
    for blk in model.blocks:
        y = blk.norm1(x)
        B, N, C = y.shape
        q, k, v = blk.attn._qkv(y)
        attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x)[:, 0]


def images_per_second(fn: Callable[[], torch.Tensor], batch: int, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def matmul_gflops(model: torch.nn.Module, tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of the first block's ``mlp.fc1`` on ``tokens`` rows in ``dtype``."""
    fc1 = model.blocks[0].mlp.fc1
    weight, bias = fc1.weight.detach().to(dtype), fc1.bias.detach().to(dtype)
    x = torch.randn(tokens, weight.shape[1], device=device, dtype=dtype)
    rows_per_s = images_per_second(lambda: torch.nn.functional.linear(x, weight, bias), tokens, 10, device)
    return 2 * weight.numel() * rows_per_s / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_backbone(args.arch, patch_size=args.patch_size, img_size=args.img_size).eval().to(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    @torch.no_grad()
    def dinocli_forward(precision: str) -> torch.Tensor:
        with autocast(precision, device):
            return embed(model, x).float()

    print(f"{args.arch}/{args.patch_size} at {args.img_size} px, batch {args.batch_size}, {device}; "
          f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    figures: dict[str, float] = {}
    figures["reference_fp32"] = images_per_second(lambda: reference_forward(model, x), args.batch_size, args.iters, device)
    figures["dinocli_fp32"] = images_per_second(lambda: dinocli_forward("fp32"), args.batch_size, args.iters, device)
    figures["dinocli_bf16"] = images_per_second(lambda: dinocli_forward("bf16"), args.batch_size, args.iters, device)
    tokens = args.batch_size * (1 + (args.img_size // args.patch_size) ** 2)
    figures["matmul_fp32_gflops"] = matmul_gflops(model, tokens, torch.float32, device)
    figures["matmul_bf16_gflops"] = matmul_gflops(model, tokens, torch.bfloat16, device)
    ref = reference_forward(model, x).float()
    fp32, bf16 = dinocli_forward("fp32"), dinocli_forward("bf16")
    figures["fp32_max_relative_difference"] = float(((fp32 - ref).norm(dim=1) / ref.norm(dim=1)).max())
    figures["bf16_min_cosine_to_fp32"] = float(torch.nn.functional.cosine_similarity(bf16, fp32).min())
    for name in ("reference_fp32", "dinocli_fp32", "dinocli_bf16"):
        print(f"{name:>15}: {figures[name]:9.1f} images/s ({figures[name] / figures['reference_fp32']:.2f}x)")
    ceiling = figures["matmul_bf16_gflops"] / figures["matmul_fp32_gflops"]
    print(f"matrix product {figures['matmul_fp32_gflops']:.0f} GFLOP/s fp32, {figures['matmul_bf16_gflops']:.0f} bf16: "
          f"bf16 can gain at most ~{ceiling:.2f}x on this machine")
    print(f"fp32 features vs reference: max relative difference {figures['fp32_max_relative_difference']:.2e}")
    print(f"bf16 features vs fp32: min cosine similarity {figures['bf16_min_cosine_to_fp32']:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, **figures}, indent=2))


if __name__ == "__main__":
    main()
