"""Training images/s of dinocli's DINO step beside a plain reference step, in the same run.

    python benchmarks/pretrain_step.py [--arch vit_tiny --patch-size 16 --batch-size 16 --iters 5]

The reference step is written here the way the reference implementation does it: explicit
attention matrices, the loss as a Python loop over view pairs, gradient clipping and the EMA update
as loops over parameters (with a host sync per tensor), fp32. dinocli's step is
``dinocli.train.loop.Trainer.step``-equivalent code from the package (fused attention, one
contraction for all loss pairs, foreach clipping and EMA), in fp32 and in bf16 autocast.
Prints images/s of each and the ratios, and the machine.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import dinocli
from dinocli.heads import DINOHead
from dinocli.runtime import autocast, cpu_has_fast_bf16
from dinocli.strategies.centering import Centering
from dinocli.train.loss import multicrop_cross_entropy
from dinocli.train.model import MultiCropNetwork, ema_update
from dinocli.train.optim import clip_gradients, param_groups


# -- the plain reference step ------------------------------------------------------------------

def explicit_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))


def use_explicit_attention(model: nn.Module) -> None:
    for block in model.blocks:
        block.attn.forward = lambda x, attn=block.attn: explicit_attention(attn, x)


class ReferenceHead(nn.Module):
    """The reference head: ``nn.utils.weight_norm`` on the last layer."""

    def __init__(self, head: DINOHead) -> None:
        super().__init__()
        self.mlp = head.mlp
        last = nn.Linear(head.last_layer.weight_v.shape[1], head.last_layer.weight_v.shape[0], bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def reference_loss(student, teacher, center, n_crops, temp=0.04):
    s = (student / 0.1).chunk(n_crops)
    t = F.softmax((teacher - center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v != iq:
                total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                terms += 1
    return total / terms


def reference_step(student, teacher, optimizer, center, views, n_crops):
    teacher_out = teacher(views[:2])[1]
    student_out = student(views)[1]
    loss = reference_loss(student_out, teacher_out, center, n_crops)
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():  # per-tensor clipping, as the reference (a host sync per tensor)
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            norm.item()
            coef = 3.0 / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    optimizer.step()
    with torch.no_grad():
        for q, k in zip(student.parameters(), teacher.parameters()):
            k.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)
        center.mul_(0.9).add_(teacher_out.mean(0, keepdim=True) * 0.1)


# -- dinocli's step ------------------------------------------------------------------------------

def dinocli_step(student, teacher, optimizer, strategy, views, n_crops, precision, params):
    device = torch.device("cpu")
    with autocast(precision, device):
        with torch.no_grad():
            teacher_logits = teacher(views[:2])[1]
        student_logits = student(views)[1]
    teacher_logits = teacher_logits.float()
    loss = multicrop_cross_entropy(student_logits, strategy.targets(teacher_logits, 0.04), n_crops)
    loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(params, 3.0)
    optimizer.step()
    ema_update(teacher, student, 0.996)
    strategy.update(teacher_logits)


def build(arch, patch_size, out_dim, reference):
    torch.manual_seed(0)
    backbone = dinocli.create_backbone(arch, patch_size=patch_size, img_size=224)
    head = DINOHead(backbone.embed_dim, out_dim)
    if reference:
        use_explicit_attention(backbone)
        head = ReferenceHead(head)
    student = MultiCropNetwork(backbone, head)
    teacher = copy.deepcopy(student)
    if reference:
        use_explicit_attention(teacher.backbone)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def images_per_s(step, batch, iters, warmup=1):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    views = [torch.randn(B, 3, 224, 224, generator=g) for _ in range(2)]
    views += [torch.randn(B, 3, 96, 96, generator=g) for _ in range(args.local_crops)]
    n_crops = len(views)

    student, teacher = build(args.arch, args.patch_size, args.out_dim, reference=True)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4, foreach=False)
    center = torch.zeros(1, args.out_dim)
    results = {"reference fp32": images_per_s(
        lambda: reference_step(student, teacher, optimizer, center, views, n_crops), B, args.iters)}

    precisions = ["fp32", "bf16"]
    for precision in precisions:
        student, teacher = build(args.arch, args.patch_size, args.out_dim, reference=False)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4, foreach=True)
        strategy = Centering(args.out_dim)
        results[f"dinocli {precision}"] = images_per_s(
            lambda: dinocli_step(student, teacher, optimizer, strategy, views, n_crops, precision, params),
            B, args.iters,
        )

    base = results["reference fp32"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, native bf16: {cpu_has_fast_bf16()}")
    print(f"{args.arch}/{args.patch_size}, 2x224 + {args.local_crops}x96 crops, batch {B}, "
          f"out_dim {args.out_dim}, {args.iters} timed iterations")
    print(f"{'step':<16}{'images/s':>10}{'ratio':>8}")
    for name, value in results.items():
        print(f"{name:<16}{value:>10.2f}{value / base:>7.2f}x")


if __name__ == "__main__":
    main()
