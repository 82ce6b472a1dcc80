"""Micro-batch plans for unpacked rows (``data.packing: false``): fixed rows or a token budget.

An epoch's plan is a list of *units*, each a list of row indices (with the epoch folded in,
``epoch · len + i``, as the packed sampler does, so a mixture draws other rows each epoch):

- **fixed** (``data.max_tokens_per_batch: null``): the seeded random order of the epoch
  (:class:`~.sampling.EpochSampler`) cut into units of ``training.batch_size × ranks`` rows; a
  unit is one global micro-batch and rank r reads its rows r, r + R, … (as packed windows).
- **token budget** (``data.max_tokens_per_batch: N``): the rows are sorted by length (ties in
  the seeded random order of the epoch, so equal-length rows meet in a new order every epoch),
  cut greedily into units whose ``rows × longest row ≤ N`` (a bucket of similar lengths per
  unit, so padding stays low), and the units are shuffled with a generator seeded by
  ``(seed, epoch)``. A unit is one rank's micro-batch: a step takes ``grad_accum × ranks``
  consecutive units and rank r trains units r, r + R, ….

Everything is a pure function of the row lengths, the seed and the epoch, computed in the main
process: the order does not depend on DataLoader workers, and the trainer's cursor (epoch,
units handed out) is the whole resume state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaConfigError
from .sampling import EpochSampler


def row_stats(dataset: Dataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, loss_tokens)`` of the rows ``dataset[i]`` reads, without reading them.

    Args:
        dataset: a :class:`~.rows.RowDataset`, or a :class:`~.mixture.MixtureDataset` of them.
        indices: ``(N,)`` int64 dataset indices (epoch folded in).

    Returns:
        Two ``(N,)`` int64 arrays.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if hasattr(dataset, "window_of"):  # a mixture: (source, row) per index
        pairs = np.array([dataset.window_of(int(i)) for i in idx], dtype=np.int64).reshape(-1, 2)
        lengths, loss = np.zeros(len(idx), np.int64), np.zeros(len(idx), np.int64)
        for s, part in enumerate(dataset.datasets):
            hit = pairs[:, 0] == s
            lengths[hit] = part.lengths[pairs[hit, 1]]
            loss[hit] = part.loss_tokens[pairs[hit, 1]]
        return lengths, loss
    rows = idx % len(dataset)
    return dataset.lengths[rows], dataset.loss_tokens[rows]


@dataclass
class EpochPlan:
    """The units of one epoch and what each costs.

    Attributes:
        units: row indices of each unit (dataset indices, epoch folded in).
        lengths: ``(N,)`` row lengths, in the order of the concatenated units.
        loss_tokens: ``(N,)`` labelled positions per row, same order.
        bounds: ``(U+1,)`` offsets of each unit in ``lengths``.
        order_lengths: ``(N,)`` the epoch's row lengths in its seeded random order (what fixed-size
            micro-batches would hold; the reference of the padding comparison).
    """

    units: list[list[int]]
    lengths: np.ndarray
    loss_tokens: np.ndarray
    bounds: np.ndarray
    order_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.units)

    def unit_loss_tokens(self, unit: int) -> int:
        """Labelled positions of a unit."""
        return int(self.loss_tokens[self.bounds[unit]:self.bounds[unit + 1]].sum())

    def unit_positions(self, unit: int, ranks: int = 1) -> tuple[int, int]:
        """``(real tokens, padded positions)`` of a unit, split over ``ranks`` by rows (each part
        padded to its own longest row)."""
        lengths = self.lengths[self.bounds[unit]:self.bounds[unit + 1]]
        parts = [lengths[r::ranks] for r in range(ranks)] if ranks > 1 else [lengths]
        return int(lengths.sum()), int(sum(p.size * int(p.max()) for p in parts if p.size))

    def padding_share(self, ranks: int = 1) -> float:
        """Share of padded positions over the whole epoch."""
        real = padded = 0
        for u in range(len(self.units)):
            a, b = self.unit_positions(u, ranks)
            real, padded = real + a, padded + b
        return 1.0 - real / padded if padded else 0.0


def plan_epoch(dataset: Dataset, seed: int, epoch: int, rows: int, max_tokens: int | None) -> EpochPlan:
    """The units of ``epoch`` (see the module docstring).

    Args:
        dataset: the training rows (:class:`~.rows.RowDataset` or a mixture of them).
        seed: the run seed.
        epoch: 0-based epoch.
        rows: rows per unit without a token budget (``batch_size × ranks``).
        max_tokens: the token budget of a unit (rows × longest row); None = ``rows`` rows per unit.

    Returns:
        The plan; a tail of fewer than ``rows`` rows is dropped in fixed mode.

    Raises:
        AvaConfigError: a budget below the longest row (that row would fit no unit).
    """
    n = len(dataset)
    order = EpochSampler(n, seed, epoch).order().numpy().astype(np.int64) + epoch * n  # (N,) seeded random order
    lengths, loss = row_stats(dataset, order)
    if max_tokens is None:
        count = (n // rows) * rows
        units = [order[i:i + rows].tolist() for i in range(0, count, rows)]
        return EpochPlan(units, lengths[:count], loss[:count], np.arange(0, count + 1, rows, dtype=np.int64), lengths)
    longest = int(lengths.max()) if n else 0
    if longest > max_tokens:
        raise AvaConfigError(
            f"data.max_tokens_per_batch={max_tokens} is below the longest row ({longest} tokens); "
            f"raise it to at least data.seq_len"
        )
    by_length = np.argsort(lengths, kind="stable")  # ties keep the seeded random order
    sorted_len = lengths[by_length]
    bounds = [0]
    start = 0
    for i in range(1, n + 1):  # sorted ascending: the unit's longest row is its last
        if i == n or (i - start + 1) * int(sorted_len[i]) > max_tokens:
            bounds.append(i)
            start = i
    cuts = np.asarray(bounds, dtype=np.int64)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 23]).generate_state(1)[0]))
    shuffled = torch.randperm(len(cuts) - 1, generator=generator).numpy()
    units, new_bounds, rows_order = [], [0], []
    for u in shuffled:
        members = by_length[cuts[u]:cuts[u + 1]]
        units.append(order[members].tolist())
        rows_order.append(members)
        new_bounds.append(new_bounds[-1] + members.size)
    flat = np.concatenate(rows_order) if rows_order else np.zeros(0, np.int64)
    return EpochPlan(units, lengths[flat], loss[flat], np.asarray(new_bounds, dtype=np.int64), lengths)


def fixed_padding_share(lengths: Sequence[int] | np.ndarray, rows: int) -> float:
    """Padding share of micro-batches of ``rows`` rows taken in the given order (each padded to
    its longest row): the reference :func:`plan_epoch`'s token budget is compared with."""
    lengths = np.asarray(lengths, dtype=np.int64)
    count = (len(lengths) // rows) * rows
    if count == 0:
        return 0.0
    grid = lengths[:count].reshape(-1, rows)
    return 1.0 - grid.sum() / (grid.max(axis=1).sum() * rows)
