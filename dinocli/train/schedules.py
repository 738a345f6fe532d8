"""Per-iteration schedules, as the reference ``cosine_scheduler`` builds them, in closed form."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``start_warmup`` to ``base`` over ``warmup_iters``, then cosine to ``final``.

    ``schedule(i)`` equals element ``i`` of the reference's ``cosine_scheduler`` array
    (``np.linspace`` warm-up, then ``final + (base - final) (1 + cos(pi j / n)) / 2``).
    """

    base: float
    final: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup: float = 0.0

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.start_warmup
            return self.start_warmup + (self.base - self.start_warmup) * it / (self.warmup_iters - 1)
        n = self.total_iters - self.warmup_iters
        j = min(it - self.warmup_iters, n)
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * j / n))


@dataclass(frozen=True)
class TeacherTempSchedule:
    """Per epoch: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``, then ``temp``."""

    warmup_temp: float
    temp: float
    warmup_epochs: int

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            if self.warmup_epochs == 1:
                return self.warmup_temp
            return self.warmup_temp + (self.temp - self.warmup_temp) * epoch / (self.warmup_epochs - 1)
        return self.temp


@dataclass(frozen=True)
class Schedules:
    """Everything that changes during training: lr, weight decay, teacher momentum and temperature."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: TeacherTempSchedule


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    global_batch: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    epochs: int,
    warmup_epochs: int,
    iters_per_epoch: int,
) -> Schedules:
    """The reference's schedules; the learning rate scales linearly with the global batch (per 256)."""
    total = epochs * iters_per_epoch
    return Schedules(
        lr=CosineSchedule(lr * global_batch / 256.0, min_lr, total, warmup_epochs * iters_per_epoch),
        weight_decay=CosineSchedule(weight_decay, weight_decay_end, total),
        momentum=CosineSchedule(momentum_teacher, 1.0, total),
        teacher_temp=TeacherTempSchedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
    )
