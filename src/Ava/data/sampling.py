"""Deterministic, resumable sampling of training windows.

The order of epoch ``e`` is ``randperm(n)`` drawn from a generator seeded with ``seed + e``: it
depends on nothing but the config, not on the number of DataLoader workers, and a run resumed at
position ``start`` of an epoch sees exactly the windows an uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of epoch ``epoch`` in its seeded random order, from position ``start`` on.

    Args:
        num_samples: dataset length.
        seed: run seed.
        epoch: epoch number (0-based).
        start: samples of this epoch already consumed (skipped).
    """

    def __init__(self, num_samples: int, seed: int, epoch: int, start: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = epoch
        self.start = start

    def order(self) -> torch.Tensor:
        """The full permutation of this epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)
