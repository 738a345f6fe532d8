"""Training speed of a timm ViT beside dinocli's own ViT with the same weights, in the same run.

    python plugins/dino-timm/benchmarks/backbone_step.py [--arch vit_tiny --crop 96 --local 48
        --batch-size 16 --local-crops 4 --depth 0 --iters 5]

Both backbones are the same architecture (``vit_tiny`` = ``timm/vit_tiny_patch16_224``,
``vit_small`` = ``timm/vit_small_patch16_224``, ``vit_base`` = ``timm/vit_base_patch16_224``) with
the same weights; one step is the student's forward and backward on the multi-crop views of a
batch (2 global crops, ``--local-crops`` local crops, each size its own forward as in training).
Prints images/s of each, the ratio timm / dinocli, the largest difference of their embeddings
(none on global crops; on local crops timm resamples the position embeddings without the
reference's 0.1 offset), and the machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import dinocli

TIMM_NAMES = {
    "vit_tiny": "timm/vit_tiny_patch16_224",
    "vit_small": "timm/vit_small_patch16_224",
    "vit_base": "timm/vit_base_patch16_224",
}


def views(batch: int, crop: int, local: int, n_local: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2 * batch, 3, crop, crop, generator=generator),
            torch.randn(n_local * batch, 3, local, local, generator=generator)]


def images_per_s(model: torch.nn.Module, crops: list[torch.Tensor], batch: int, iters: int) -> float:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.cat([model(x) for x in crops]).square().mean().backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(TIMM_NAMES), default="vit_tiny")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--local", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--depth", type=int, default=0, help="blocks (0: the architecture's 12)")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    depth = {"depth": args.depth} if args.depth else {}
    ours = dinocli.create_backbone(args.arch, patch_size=16, img_size=args.crop, drop_path_rate=0.1, **depth)
    theirs = dinocli.create_backbone(TIMM_NAMES[args.arch], img_size=args.crop, drop_path_rate=0.1, **depth)
    theirs.model.load_state_dict(ours.state_dict(), strict=True)
    crops = views(args.batch_size, args.crop, args.local, args.local_crops)
    with torch.no_grad():  # global crops: same grid; local crops: each resamples its position embeddings
        diff_global, diff_local = ((ours.eval()(x) - theirs.eval()(x)).abs().max().item() for x in crops)

    rate_ours = images_per_s(ours, crops, args.batch_size, args.iters)
    rate_timm = images_per_s(theirs, crops, args.batch_size, args.iters)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, timm {__import__('timm').__version__}, CPU fp32")
    print(f"{args.arch}, depth {args.depth or 12}, batch {args.batch_size}: 2 x {args.crop} px + "
          f"{args.local_crops} x {args.local} px crops, forward + backward, {args.iters} steps")
    print(f"  dinocli {args.arch:<28} {rate_ours:8.1f} images/s")
    print(f"  {TIMM_NAMES[args.arch]:<36} {rate_timm:8.1f} images/s")
    print(f"  ratio timm / dinocli: {rate_timm / rate_ours:.2f}")
    print(f"  largest embedding difference, same weights, eval: {diff_global:.2e} on global crops, "
          f"{diff_local:.2e} on local crops (position embeddings resampled differently)")


if __name__ == "__main__":
    main()
