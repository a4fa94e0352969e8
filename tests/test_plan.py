"""The global sample sequence: the same global batches whoever reads them, full coverage, windows."""

from __future__ import annotations

import collections

import pytest

from mmpretrain.data.plan import (
    REGIONS,
    batch_count,
    derive_seed,
    drawn_shards,
    epoch_sequence,
    rank_share,
    shard_order,
)
from mmpretrain.shards.resolve import Shard


def _shards(sizes, source=0):
    return [Shard(f"s{source}-{i}.tar", n, source) for i, n in enumerate(sizes)]


def _sequence(shards, epoch=1, window=8, mode="epoch", total=None, weights=None):
    total = sum(s.size for s in shards) if total is None else total
    return epoch_sequence(shards, seed=3, epoch=epoch, mode=mode, shuffle=True, window=window,
                          weights=weights or {0: 1.0}, total=total)


def _global_batches(seq, world, batch, drop_last):
    """Per global batch, per rank: the (shard, index) samples read."""
    out = []
    for k in range(batch_count(seq.total, world * batch, drop_last)):
        ranks = []
        for rank in range(world):
            share = rank_share(seq, k * world * batch, world * batch, rank, batch)
            ranks.append([(seq.shards[e].url, i) for e, i in (seq.locate(slot.index) for slot in share)])
        out.append(ranks)
    return out


CASES = [  # shard sizes, world, batch size
    ([100], 2, 8),
    ([3, 50, 1, 7, 200, 13], 2, 4),  # very uneven shards
    ([10] * 7, 3, 5),
    ([1, 1, 1], 2, 1),
    ([37, 5], 4, 3),
]


@pytest.mark.parametrize("sizes, world, batch", CASES)
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_rank_gets_the_same_batch_count_and_distinct_samples(sizes, world, batch, drop_last):
    seq, total = _sequence(_shards(sizes)), sum(sizes)
    batches = _global_batches(seq, world, batch, drop_last)
    seen = [s for ranks in batches for share in ranks for s in share]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across all ranks
    if drop_last:
        assert all(len(share) == batch for ranks in batches for share in ranks)  # full batches only
        assert len(seen) == total // (world * batch) * world * batch  # only the last partial global batch out
    else:
        assert sorted(seen) == sorted((s.url, i) for s in _shards(sizes) for i in range(s.size))


@pytest.mark.parametrize("sizes", [[100], [3, 50, 1, 7, 200, 13], [10] * 7])
def test_a_global_batch_is_the_same_samples_on_any_number_of_processes(sizes):
    seq = _sequence(_shards(sizes), window=16)
    reference = None
    for world in (1, 2, 3, 4, 6, 12):
        got = [sorted(s for share in ranks for s in share) for ranks in _global_batches(seq, world, 12 // world, True)]
        reference = reference or got
        assert got == reference


def test_windows_mix_every_region_of_the_epoch_and_change_with_the_epoch():
    shards = _shards([30, 30, 30, 30, 30, 30])  # 180 samples: 16 regions, 4 of 12 samples then 12 of 11
    seq = _sequence(shards, window=32)
    assert REGIONS == 16
    order = [seq.unshuffled(p) for p in range(180)]
    assert sorted(order) == list(range(180))  # a permutation of the epoch
    for first in range(0, 160, 32):  # each window: 2 consecutive samples of each of the 16 regions
        regions = collections.Counter(i // 12 if i < 48 else 4 + (i - 48) // 11 for i in order[first:first + 32])
        assert len(regions) == 16 and set(regions.values()) == {2}, first
        assert len({seq.locate(i)[0] for i in order[first:first + 32]}) == 6  # every shard
    assert order != [_sequence(shards, epoch=2, window=32).unshuffled(p) for p in range(180)]
    plain = epoch_sequence(shards, seed=3, epoch=1, mode="epoch", shuffle=False, window=32, weights={0: 1.0}, total=180)
    assert [plain.unshuffled(p) for p in range(180)] == list(range(180))  # evaluation: the shards in order


def test_resampled_draws_follow_the_source_weights_in_samples():
    shards = _shards([10] * 5, 0) + _shards([40] * 5, 1)  # source 1's shards are 4x larger
    drawn = drawn_shards(shards, {0: 3.0, 1: 1.0}, seed=0, epoch=0, total=20_000)
    assert 20_000 <= sum(s.size for s in drawn) < 20_000 + 10 + 40  # each source overshoots by under a shard
    by_source = collections.Counter()
    for s in drawn:
        by_source[s.source] += s.size
    assert abs(by_source[0] / sum(by_source.values()) - 0.75) < 0.003  # its share, to a shard
    passes = collections.Counter(s.url for s in drawn if s.source == 0)
    assert max(passes.values()) - min(passes.values()) <= 1  # whole shuffled passes: no shard drawn twice as often
    once = drawn_shards(shards, {0: 1.0, 1: 1.0}, seed=0, epoch=0, total=250)  # 125 samples from each source
    assert len({s.url for s in once if s.source == 1}) == sum(1 for s in once if s.source == 1)  # 200 held: no repeat
    assert drawn == drawn_shards(shards, {0: 3.0, 1: 1.0}, seed=0, epoch=0, total=20_000)
    assert drawn != drawn_shards(shards, {0: 3.0, 1: 1.0}, seed=0, epoch=1, total=20_000)
    seq = _sequence(shards, mode="resampled", total=1000, weights={0: 3.0, 1: 1.0})
    assert seq.total == 1000 and sum(s.size for s in seq.shards) >= 1000


def test_shard_order_depends_on_seed_and_epoch_only():
    shards = _shards([5] * 20)
    a = shard_order(shards, seed=1, epoch=0, shuffle=True)
    assert a == shard_order(shards, seed=1, epoch=0, shuffle=True)
    assert a != shard_order(shards, seed=1, epoch=1, shuffle=True)
    assert a != shard_order(shards, seed=2, epoch=0, shuffle=True)
    assert sorted(a, key=lambda s: s.url) == sorted(shards, key=lambda s: s.url)
    assert shard_order(shards, seed=1, epoch=0, shuffle=False) == shards


def test_derive_seed_is_stable_and_separates_parts():
    assert derive_seed(0, "buffer", 1, 0, 0) == derive_seed(0, "buffer", 1, 0, 0)
    assert len({derive_seed(0, "buffer", e, r, w) for e in range(3) for r in range(3) for w in range(3)}) == 27
    assert 0 <= derive_seed("x") < 2**63
