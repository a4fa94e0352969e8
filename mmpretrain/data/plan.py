"""Who reads what: one global sample sequence per epoch, the same whoever reads it.

The sequence of an epoch depends only on (seed, epoch, the shards and their sizes):

- epoch mode: the shards in an order shuffled by (seed, epoch), their samples concatenated;
- resampled mode: each source's share of the epoch (its weight's) filled by shuffled passes over its
  shards (drawn_shards), all of them shuffled by (seed, epoch), concatenated up to the epoch's length;
- that sequence is cut into REGIONS contiguous regions, which are interleaved (position q holds
  sample q // REGIONS of region q % REGIONS), so any stretch of the sequence mixes samples from
  every part of the epoch, as parallel readers of distinct regions did;
- then cut into consecutive windows of `window` samples (data.shuffle_buffer), each permuted by
  (seed, epoch, window). Effective shuffle: the shard order, then each window draws window / REGIONS
  consecutive samples from each of the REGIONS regions and permutes them.

Global batch k of an epoch resumed at sample `start` holds positions [start + k G, start + (k+1) G),
G = processes x batch size. Rank r takes the r-th `batch_size` of them, ranked by their place in the
concatenated shards (the order inside a batch does not change a loss; sorting keeps each process on
about 1/world of the regions). A rank's batches go to its DataLoader workers round-robin,
which is the order DataLoader takes them in: batch k of an iterator comes from worker k % workers.
So the G samples of a global batch are the same on 1 process x G or 8 x G/8, with any worker count,
and a checkpoint need only store `start`.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass, field

from mmpretrain.errors import UserError
from mmpretrain.shards.resolve import Shard


def derive_seed(*parts) -> int:
    """A 63-bit seed from named parts, e.g. derive_seed(seed, "window", epoch, index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return order


def drawn_shards(shards: list[Shard], weights: dict[int, float], seed: int, epoch: int, total: int) -> list[Shard]:
    """Resampled mode: the shards of an epoch of `total` samples. Each source gets its weight's share
    of them, filled by passes over its shards, each pass in an order shuffled by (seed, epoch); then
    all the drawn shards are shuffled together. A source's shards repeat within an epoch only when its
    share is larger than the source (drawing with replacement would put a repeat of ~1 in 3 samples
    into every epoch, and identical pairs into the same batches)."""
    by_source: dict[int, list[Shard]] = {}
    for shard in shards:
        if shard.size:
            by_source.setdefault(shard.source, []).append(shard)
    sources = sorted(by_source)
    if not sources:
        raise UserError("resampled mode: none of the shards holds a sample")
    rng, drawn = random.Random(derive_seed(seed, "resample", epoch)), []
    weight_sum = sum(weights[s] for s in sources)
    for source in sources:
        need = total * weights[source] / weight_sum
        while need > 0:
            order = list(by_source[source])
            rng.shuffle(order)
            for shard in order:
                if need <= 0:
                    break
                drawn.append(shard)
                need -= shard.size
    rng.shuffle(drawn)
    return drawn


REGIONS = 16  # interleaved regions of a shuffled epoch; also the shards a worker holds open at once


@dataclass(frozen=True)
class Slot:
    """One sample of a batch: its position in the epoch's sequence and its index in the concatenated shards."""

    position: int
    index: int


@dataclass
class GlobalSequence:
    """An epoch's global sample sequence: position -> (entry of `shards`, sample index in that shard)."""

    shards: list[Shard]  # in sequence order; resampled mode may list a shard twice
    total: int  # positions in the epoch (resampled: the epoch's length, the last draw cut short)
    window: int  # samples per shuffle window (1: no shuffle)
    seed: int
    epoch: int
    regions: int = REGIONS  # 1: no interleave
    starts: list[int] = field(init=False)
    _perms: dict[int, list[int]] = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.window = max(1, self.window)
        self.starts, offset = [], 0
        for shard in self.shards:
            self.starts.append(offset)
            offset += shard.size
        self.total = min(self.total, offset)

    def unshuffled(self, position: int) -> int:
        """Where `position` sits in the concatenated shards (before the window shuffle and interleave)."""
        if self.window > 1:
            w, offset = divmod(position, self.window)
            position = w * self.window + self._perm(w)[offset]
        if self.regions == 1:
            return position
        base, extra = divmod(self.total, self.regions)  # regions < extra hold base + 1 samples
        i, region = divmod(position, self.regions)
        return region * base + min(region, extra) + i

    def region_of(self, index: int) -> int:
        """The interleaved region holding unshuffled index `index`."""
        base, extra = divmod(self.total, self.regions)
        big = extra * (base + 1)  # regions < extra hold base + 1 samples
        return index // (base + 1) if index < big else extra + (index - big) // max(base, 1)

    def window_of(self, position: int) -> tuple[int, int]:
        """[first, stop) of the window holding `position` (in either order: a window maps to itself)."""
        first = position // self.window * self.window
        return first, min(first + self.window, self.total)

    def locate(self, index: int) -> tuple[int, int]:
        """(entry, sample index in its shard) of unshuffled index `index`."""
        entry = bisect.bisect_right(self.starts, index) - 1
        return entry, index - self.starts[entry]

    def _perm(self, w: int) -> list[int]:
        if w not in self._perms:
            if len(self._perms) >= 4:  # a worker moves forward: the windows behind it are done
                self._perms.pop(next(iter(self._perms)))
            first, stop = self.window_of(w * self.window)
            perm = list(range(stop - first))
            random.Random(derive_seed(self.seed, "window", self.epoch, w)).shuffle(perm)
            self._perms[w] = perm
        return self._perms[w]


def epoch_sequence(shards: list[Shard], *, seed: int, epoch: int, mode: str, shuffle: bool, window: int,
                   weights: dict[int, float], total: int) -> GlobalSequence:
    """The global sequence of `epoch` (see the module docstring); `total`: its length."""
    if mode == "epoch":
        ordered = shard_order(shards, seed, epoch, shuffle)
    else:
        ordered = drawn_shards(shards, weights, seed, epoch, total)
    return GlobalSequence(ordered, total, window if shuffle else 1, seed, epoch, REGIONS if shuffle else 1)


def batch_count(remaining: int, global_batch: int, drop_last: bool) -> int:
    """Global batches left in an epoch with `remaining` positions: whole ones only when drop_last."""
    return remaining // global_batch if drop_last else -(-remaining // global_batch)


def rank_share(seq: GlobalSequence, first: int, global_batch: int, rank: int, batch_size: int) -> list[Slot]:
    """The slots rank `rank` reads of the global batch starting at position `first`, in the order of
    the concatenated shards (positions past the epoch's end are not in the batch: evaluation's last)."""
    stop = min(first + global_batch, seq.total)
    members = sorted((Slot(p, seq.unshuffled(p)) for p in range(first, stop)), key=lambda slot: slot.index)
    return members[rank * batch_size:(rank + 1) * batch_size]
