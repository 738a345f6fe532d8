"""The order in which training sees images: a seeded permutation per epoch, shared by all processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Yields the image indices of this process, epoch by epoch.

    Each epoch is a permutation seeded by ``(seed, epoch)``, cut into global batches of
    ``batch_size * world_size`` (an incomplete last batch is dropped); process ``rank`` takes the
    ``rank``-th slice of ``batch_size`` of every global batch. So N processes with batch B/N see
    exactly the images one process with batch B sees.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Start ``epoch``, leaving out its first ``skip_batches`` batches (resuming mid-epoch)."""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.skip, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            yield from order[start : start + self.batch_size]
