"""Weighted mixtures of sources, deterministic and resumable.

An epoch of a mixture has ``N`` slots (by default the total windows of all sources). Source
``s`` gets ``c_s ≈ N · w_s / Σw`` of them (largest remainder), spread evenly over the epoch
(its ``k``-th slot sits at time ``(k + ½) / c_s``); the trainer's sampler then shuffles slots as
usual. The ``k``-th slot of source ``s`` in epoch ``e`` reads that source's window number
``e·c_s + k`` of an endless sequence of seeded permutations of its windows: a down-weighted source
shows new windows every epoch, an up-weighted one repeats its windows in a fresh order.

Everything is a pure function of ``(seed, epoch, slot)``: the order does not depend on the number
of DataLoader workers, and a resumed run needs only the trainer's ``(epoch, position)`` cursor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaDataError
from .packing import PackedDataset


def slot_counts(sizes: Sequence[int], weights: Sequence[float], total: int) -> np.ndarray:
    """Slots per source: ``total · w / Σw`` rounded by largest remainder (each source ≥ 1 slot)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return np.maximum(counts, 1)


class MixtureDataset(Dataset):
    """Windows of several sources, interleaved by weight.

    Args:
        datasets: one :class:`PackedDataset` per source (its ``source_id`` is set to its index).
        weights: mixture weight per source (> 0).
        seed: the run seed (per-source window permutations).
        names: source names (for reports).
        epoch_size: slots per epoch; default the total windows of all sources.
        shuffle: permute each source's windows (training); False reads them in order
            (validation, where each window is used once when weights ∝ sizes).

    ``dataset[e · len + i]`` is slot ``i`` of epoch ``e`` (indices below ``len`` are epoch 0).
    """

    def __init__(
        self, datasets: Sequence[PackedDataset], weights: Sequence[float], seed: int,
        names: Sequence[str] | None = None, epoch_size: int | None = None, shuffle: bool = True,
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise AvaDataError("a mixture needs one weight per source")
        self.datasets = list(datasets)
        for i, d in enumerate(self.datasets):
            d.source_id = i
        self.names = list(names) if names is not None else [str(i) for i in range(len(datasets))]
        self.weights = [float(w) for w in weights]
        self.seed = seed
        self.shuffle = shuffle
        sizes = [len(d) for d in self.datasets]
        self.counts = slot_counts(sizes, self.weights, epoch_size or sum(sizes))  # (S,)
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        sources = np.concatenate([np.full(c, s, dtype=np.int64) for s, c in enumerate(self.counts)])
        ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in self.counts])
        order = np.lexsort((sources, times))
        self.slot_source = sources[order]  # (N,)
        self.slot_rank = ranks[order]  # (N,)
        self.seq_len = self.datasets[0].seq_len

    def __len__(self) -> int:
        return int(self.slot_source.shape[0])

    def window_of(self, index: int) -> tuple[int, int]:
        """``(source, window)`` read by ``dataset[index]``."""
        epoch, slot = divmod(int(index), len(self))
        s = int(self.slot_source[slot])
        k = epoch * int(self.counts[s]) + int(self.slot_rank[slot])
        n = len(self.datasets[s])
        if not self.shuffle:
            return s, k % n
        return s, int(self._permutation(s, k // n)[k % n])

    @functools.lru_cache(maxsize=16)
    def _permutation(self, source: int, cycle: int) -> np.ndarray:
        seed = int(np.random.SeedSequence([self.seed, source, cycle]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.datasets[source]), generator=generator).numpy()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, window = self.window_of(index)
        return self.datasets[s][window]

    @property
    def num_tokens(self) -> int:
        return sum(d.num_tokens for d in self.datasets)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len(d)} windows × w={w:g} → {c}" for n, d, w, c in
                          zip(self.names, self.datasets, self.weights, self.counts))
        return f"MixtureDataset({len(self)} slots per epoch; {parts})"
