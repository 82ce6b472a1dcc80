"""Weighted mixtures: slot counts, interleaving, per-epoch windows, determinism."""

import numpy as np
import torch

from Ava.data.mixture import MixtureDataset, slot_counts
from Ava.data.packing import PackedDataset, TokenStream


def _source(n_windows: int, offset: int, T: int = 4) -> PackedDataset:
    tokens = (np.arange(n_windows * T) + offset).astype(np.uint32)
    return PackedDataset(TokenStream(tokens, np.array([0], dtype=np.int64)), T)


def test_slot_counts_follow_the_weights_and_sum_to_the_total():
    counts = slot_counts([10, 10, 10], [3.0, 1.0, 1.0], 100)
    assert counts.tolist() == [60, 20, 20]
    assert slot_counts([5, 5], [1.0, 1e-9], 10).tolist() == [10, 1]  # every source keeps a slot


def test_each_epoch_draws_sources_in_proportion_and_windows_without_repeats():
    big, small = _source(30, 0), _source(10, 10_000)
    mix = MixtureDataset([big, small], [1.0, 3.0], seed=0, names=["big", "small"])
    assert len(mix) == 40 and mix.counts.tolist() == [10, 30]
    for epoch in range(3):
        picks = [mix.window_of(epoch * len(mix) + i) for i in range(len(mix))]
        sources = [s for s, _ in picks]
        assert sources.count(0) == 10 and sources.count(1) == 30
        # the up-weighted source repeats each window exactly 3 times per epoch
        small_windows = [w for s, w in picks if s == 1]
        assert sorted(small_windows) == sorted(list(range(10)) * 3)
    # the down-weighted source shows new windows every epoch: 3 epochs × 10 = all 30, once each
    big_windows = [mix.window_of(e * len(mix) + i)[1] for e in range(3) for i in range(len(mix))
                   if mix.window_of(e * len(mix) + i)[0] == 0]
    assert sorted(big_windows) == list(range(30))


def test_samples_carry_their_source_and_are_deterministic():
    a = MixtureDataset([_source(6, 0), _source(6, 500)], [1.0, 1.0], seed=3)
    b = MixtureDataset([_source(6, 0), _source(6, 500)], [1.0, 1.0], seed=3)
    for i in range(0, 36, 5):
        sa, sb = a[i], b[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert int(sa["source"]) == (0 if int(sa["input_ids"][0]) < 500 else 1)
    # sources are spread over the epoch, not one block after the other
    assert a.slot_source[:4].tolist() in ([0, 1, 0, 1], [1, 0, 1, 0])


def test_unshuffled_mixture_proportional_to_size_reads_every_window_once():
    mix = MixtureDataset([_source(6, 0), _source(3, 500)], [6, 3], seed=0, shuffle=False)
    picks = sorted(mix.window_of(i) for i in range(len(mix)))
    assert picks == [(0, w) for w in range(6)] + [(1, w) for w in range(3)]


def test_batches_do_not_depend_on_the_number_of_workers():
    from torch.utils.data import DataLoader

    from Ava.data.sampling import EpochSampler

    mix = MixtureDataset([_source(12, 0), _source(5, 500)], [2.0, 1.0], seed=1)
    epoch = 1
    order = (EpochSampler(len(mix), 1, epoch).order() + epoch * len(mix)).tolist()
    batches = [order[i:i + 3] for i in range(0, len(order) - 2, 3)]
    runs = [[b["input_ids"] for b in DataLoader(mix, batch_sampler=batches, num_workers=w)] for w in (0, 2)]
    assert len(runs[0]) == len(batches)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
