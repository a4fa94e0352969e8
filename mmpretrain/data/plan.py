"""Who reads what in an epoch: the arithmetic that gives every process the same number of batches.

Epoch mode: the epoch's shard order (shuffled by (seed, epoch), identical on every rank) defines
one global sequence of samples. It is cut into `world` contiguous ranges of whole batches, so
ranks read distinct samples even when there are fewer shards than processes × workers, and only
boundary shards are opened by two readers. Each rank's batches are dealt to its workers in
contiguous blocks; PyTorch's DataLoader takes batches from workers round-robin, so rank batch `c`
is batch `c // W` of worker `c % W`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from mmpretrain.shards.resolve import Shard


def derive_seed(*parts) -> int:
    """A 63-bit seed from named parts, e.g. derive_seed(seed, "shuffle", epoch, rank, worker)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard."""

    shard: Shard
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    batches: int  # batches this worker yields this epoch
    first_batch: int  # index of its first batch among the rank's batches
    segments: tuple[Segment, ...]  # the samples it reads, in order
    samples: int  # total samples in segments (may be fewer than batches * batch_size)


def batches_per_rank(total: int, world: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return total // (world * batch_size)
    return _ceil_div(_ceil_div(total, world), batch_size)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_range(total: int, rank: int, world: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """[start, stop) of the global sample sequence that `rank` reads."""
    if drop_last:
        per_rank = total // (world * batch_size) * batch_size
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def worker_block(batches: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(first batch, batch count) of `worker`: earlier workers get the extra batches."""
    base, extra = divmod(batches, num_workers)
    return worker * base + min(worker, extra), base + (worker < extra)


def consumed_by_worker(consumed: int, worker: int, num_workers: int) -> int:
    """How many of its own batches `worker` had delivered when the rank had delivered `consumed`."""
    return max(0, (consumed - worker + num_workers - 1) // num_workers)


def shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return order


def epoch_plan(
    shards: list[Shard], *, seed: int, epoch: int, rank: int, world: int, worker: int, num_workers: int,
    batch_size: int, drop_last: bool, shuffle: bool,
) -> WorkerPlan:
    order = shard_order(shards, seed, epoch, shuffle)
    total = sum(s.size for s in order)
    batches = batches_per_rank(total, world, batch_size, drop_last)
    lo, hi = rank_range(total, rank, world, batch_size, drop_last)
    first, count = worker_block(batches, worker, num_workers)
    start = min(lo + first * batch_size, hi)
    stop = min(lo + (first + count) * batch_size, hi)
    return WorkerPlan(count, first, tuple(_segments(order, start, stop)), stop - start)


def _segments(order: list[Shard], start: int, stop: int):
    """Cut the global range [start, stop) into per-shard pieces."""
    offset = 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + shard.size)
        if lo < hi:
            yield Segment(shard, lo - offset, hi - offset)
        offset += shard.size
        if offset >= stop:
            break
