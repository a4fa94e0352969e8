"""The epoch arithmetic: equal batch counts on every rank, distinct samples, full coverage."""

from __future__ import annotations

import itertools

import pytest

from mmpretrain.data.plan import (
    batches_per_rank,
    consumed_by_worker,
    derive_seed,
    epoch_plan,
    shard_order,
    worker_block,
)
from mmpretrain.shards.resolve import Shard


def _shards(sizes):
    return [Shard(f"s{i}.tar", n, 0) for i, n in enumerate(sizes)]


def _samples(plan):
    return [(seg.shard.url, i) for seg in plan.segments for i in range(seg.start, seg.stop)]


CASES = [  # shard sizes, world, workers, batch size
    ([100], 2, 2, 8),  # one shard, fewer shards than processes x workers
    ([3, 50, 1, 7, 200, 13], 2, 3, 4),  # very uneven shards
    ([10] * 7, 3, 2, 5),
    ([1, 1, 1], 2, 4, 1),
    ([37, 5], 4, 1, 3),
]


@pytest.mark.parametrize("sizes, world, workers, batch", CASES)
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_rank_gets_the_same_batch_count_and_distinct_samples(sizes, world, workers, batch, drop_last):
    shards, total = _shards(sizes), sum(sizes)
    seen, per_rank_batches = [], []
    for rank in range(world):
        rank_batches = 0
        for worker in range(workers):
            plan = epoch_plan(shards, seed=3, epoch=1, rank=rank, world=world, worker=worker,
                              num_workers=workers, batch_size=batch, drop_last=drop_last, shuffle=True)
            assert plan.samples == sum(seg.stop - seg.start for seg in plan.segments)
            assert plan.samples <= plan.batches * batch
            if drop_last:
                assert plan.samples == plan.batches * batch  # full batches only
            rank_batches += plan.batches
            seen += _samples(plan)
        per_rank_batches.append(rank_batches)
    assert len(set(per_rank_batches)) == 1
    assert per_rank_batches[0] == batches_per_rank(total, world, batch, drop_last)
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across all ranks and workers
    if drop_last:
        assert total - len(seen) < world * batch  # only the last partial global batch is left out
    else:
        assert len(seen) == total  # evaluation: every sample exactly once


def test_round_robin_bookkeeping_matches_worker_blocks():
    for batches, workers in itertools.product(range(0, 23), range(1, 6)):
        blocks = [worker_block(batches, w, workers) for w in range(workers)]
        assert sum(count for _, count in blocks) == batches
        # DataLoader order: rank batch c comes from worker c % W; replay it and check the counts
        delivered = [0] * workers
        for c in range(batches):
            delivered[c % workers] += 1
            for w in range(workers):
                assert consumed_by_worker(c + 1, w, workers) == delivered[w]
        assert delivered == [count for _, count in blocks]


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
