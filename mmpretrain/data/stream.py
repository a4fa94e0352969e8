"""The per-worker sample stream: global sequence -> this worker's share -> read, check, decode -> batches.

mmpretrain.data.plan defines each epoch's global sample sequence from (seed, epoch, data) alone and
which samples of each global batch a rank reads; a rank's batches are dealt to its DataLoader workers
round-robin. A worker reads one read-window (the shuffle window, at least READ_CHUNK samples) at a
time: each shard of the window is opened once and only the samples this worker delivers are read
(a local tar seeks past the others), so resuming anywhere costs nothing and reads nothing twice.
Augmentation and masking draw from a generator seeded by (seed, epoch, the sample's place in the
sequence), so a sample looks the same whoever reads it. No global RNG leaks in or out.

An unusable slot (a sample the decoder rejects or cannot decode, one with a member over
`max_member_bytes`, or one a defective shard no longer holds) is refilled with another sample chosen
by (seed, epoch, slot): first from the same shuffle window, then from all the listed shards. The skip is
counted by reason and the refill as "refilled", so batches stay full and identical across process and
worker counts, and nothing is dropped without a record.

A defective shard (cut short, gone, or holding fewer samples than sizes.json lists: shards.reader)
does not stop training: its readable samples are used, and each batch's meta carries the defects its
worker met (once per shard and epoch) to the main process, where the trainer logs them. Evaluation
(drop_last=False, every sample exactly once) stops on one instead. Two findings in a readable shard
make a defect line too: samples with a member over `max_member_bytes` (each a counted "too_large"
skip; no member is read before its size is known), and a read none of whose samples is usable (no
captions: open_clip #569). Other unusable samples are only counted, by reason: img2dataset's LAION
shards hold a few empty captions in most shards, and a warning per shard and epoch would bury the
ones that matter.

A user error in a DataLoader worker travels to the main process in the batch meta and is raised
there as it was: DataLoader's own re-raise would put the worker's traceback into its message.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset, get_worker_info

from mmpretrain.config import DataMode, choices
from mmpretrain.data.plan import GlobalSequence, Slot, batch_count, derive_seed, epoch_sequence, rank_share
from mmpretrain.errors import UserError
from mmpretrain.shards.reader import MAX_MEMBER_BYTES, TOO_LARGE, ShardError, iter_tar_samples, too_large
from mmpretrain.shards.resolve import Shard, ShardSource

# A worker reads at least this many consecutive positions of the sequence at once, rounded up to whole
# shuffle windows and whole rounds of the regions (plan.REGIONS), so that its cursors only move forward.
READ_CHUNK = 256
# An unusable slot is refilled from its own shuffle window for this many tries, then from any listed
# shard; after MAX_REFILL_TRIES the shards hold (next to) no usable sample and the run stops.
WINDOW_REFILL_TRIES = 16
MAX_REFILL_TRIES = 1000

# The problems a defect line names besides the reader's ShardError ones (metrics.jsonl "data" lines).
OVERSIZED = "too_large"  # samples with a member over max_member_bytes (also their skip reason)
NO_USABLE = "no_usable_samples"  # every sample read from the shard was unusable
NO_USABLE_READ = 4  # fewer unusable samples read from a larger shard say nothing of the shard


@dataclass(frozen=True)
class StreamConfig:
    shards: tuple[ShardSource, ...]
    batch_size: int  # per process
    mode: str = "epoch"  # "epoch": one pass, no sample twice; "resampled": weighted sources, virtual epochs
    seed: int = 0
    shuffle: bool = True  # shard order and the sample window
    shuffle_buffer: int = 1000  # samples per shuffle window of the global sequence
    drop_last: bool = True  # False (evaluation): every sample once, last batches may be short
    samples_per_epoch: int | None = None  # resampled: length of a (virtual) epoch; default: all samples
    max_member_bytes: int | None = MAX_MEMBER_BYTES  # larger members make a "too_large" skip; None: no limit

    @property
    def reads_past_defects(self) -> bool:
        """Training reads on past a defective shard; evaluation's numbers would be wrong without it."""
        return self.drop_last or self.mode == "resampled"


@dataclass
class Position:
    """Where a loader stands: the epoch, and how many samples of its global sequence all processes
    together have been handed (a multiple of the global batch, but for evaluation's last batch)."""

    epoch: int = 0
    samples: int = 0


class ShardStream(IterableDataset):
    """Yields whole batches (DataLoader batch_size=None). `decoder` turns raw samples into items and
    items into a batch; it is the only part that knows about images or text."""

    def __init__(self, cfg: StreamConfig, shards: list[Shard], decoder, rank: int = 0, world: int = 1):
        if cfg.mode not in choices(DataMode):
            raise UserError(f"data mode must be one of {', '.join(choices(DataMode))}, got '{cfg.mode}'")
        self.cfg, self.shards, self.decoder, self.rank, self.world = cfg, shards, decoder, rank, world
        self.position = Position()
        self._sequence: GlobalSequence | None = None
        self.listed = GlobalSequence(list(shards), sum(s.size for s in shards), 1, cfg.seed, -1, 1)  # refills

    # -- sizes -------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    @property
    def drop_last(self) -> bool:
        return self.cfg.drop_last or self.cfg.mode == "resampled"

    def total_samples(self) -> int:
        if self.cfg.mode == "resampled" and self.cfg.samples_per_epoch:
            return self.cfg.samples_per_epoch
        return sum(s.size for s in self.shards)

    def batches_per_epoch(self) -> int:
        return batch_count(self.total_samples(), self.global_batch, self.drop_last)

    def batches_left(self) -> int:
        """Batches of the current epoch from the current position on."""
        return batch_count(self.total_samples() - self.position.samples, self.global_batch, self.drop_last)

    def sequence(self, epoch: int) -> GlobalSequence:
        """The global sample sequence of `epoch` (plan.epoch_sequence)."""
        if self._sequence is None or self._sequence.epoch != epoch:
            cfg = self.cfg
            self._sequence = epoch_sequence(
                self.shards, seed=cfg.seed, epoch=epoch, mode=cfg.mode, shuffle=cfg.shuffle,
                window=cfg.shuffle_buffer, weights={i: s.weight for i, s in enumerate(cfg.shards)},
                total=self.total_samples())
        return self._sequence

    def shares(self, worker: int, num_workers: int) -> Iterator[list[Slot]]:
        """The slots of each batch `worker` delivers from the current position on (taken now: without
        workers the loader moves the position while the batches are read)."""
        start, size, count = self.position.samples, self.global_batch, self.batches_left()
        seq = self.sequence(self.position.epoch)
        return (rank_share(seq, start + k * size, size, self.rank, self.cfg.batch_size)
                for k in range(worker, count, num_workers))

    # -- iteration (runs in each DataLoader worker) ------------------------------------------
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.position.epoch
        reader = _WindowReader(self, self.sequence(epoch), _Defects(epoch))
        try:
            for share, samples in reader.batches(self.shares(worker, num_workers)):
                items = [self._usable(reader, slot, sample) for slot, sample in zip(share, samples)]
                seeds = [derive_seed(self.cfg.seed, "sample", epoch, slot.index) for slot in share]
                batch = self.decoder.collate(items, seeds)
                # (batch, meta): what the worker met travels beside the typed batch record
                yield batch, {"skipped": dict(reader.take_skipped()), "defects": reader.defects.take()}
        except UserError as e:
            if info is None:
                raise
            yield None, {"error": e}  # Loader raises it in the main process, its one line intact
        finally:
            reader.close()

    def _usable(self, reader: _WindowReader, slot: Slot, sample: dict | None):
        """The slot's decoded item: its own sample's, or a refill's (module docstring)."""
        item = reader.decode(sample, count=True)
        if item is not None:
            return item
        seq = reader.seq
        first, stop = seq.window_of(slot.position)
        for attempt in range(MAX_REFILL_TRIES):
            draw = derive_seed(self.cfg.seed, "refill", seq.epoch, slot.index, attempt)
            if attempt < WINDOW_REFILL_TRIES:
                sample = reader.read_one(seq, seq.unshuffled(first + draw % (stop - first)))
            else:  # any listed sample: a resampled epoch may have drawn only defective shards
                sample = reader.read_one(self.listed, draw % self.listed.total)
            item = reader.decode(sample, count=False)
            if item is not None:
                reader.skipped["refilled"] += 1
                return item
        raise UserError(
            f"no usable samples left for rank {self.rank} ({MAX_REFILL_TRIES} refill tries failed; skipped: "
            f"{dict(reader.skipped_total)}; defective shards met: {reader.defects.summary()}); check that "
            "the shards exist and hold images and captions under the configured keys (`mmpretrain inspect`)"
        )


class _WindowReader:
    """The raw samples of a worker's batches, read a chunk of whole shuffle windows at a time (module
    docstring). The positions of a chunk take consecutive samples of each region, so a worker keeps one
    cursor per (shard, region) it is in and moves it forward: a shard is opened once per worker, epoch
    and region it holds (once, when there are many more shards than regions), and a local tar seeks
    past the samples other readers take."""

    def __init__(self, stream: ShardStream, seq: GlobalSequence, defects: _Defects):
        self.stream, self.seq, self.defects = stream, seq, defects
        unit = math.lcm(seq.window, seq.regions)
        self.chunk = -(-READ_CHUNK // unit) * unit
        self.cache: dict[int, dict | None] = {}
        self.read_chunks: set[int] = set()
        self.cursors: dict[tuple[int, int], _Cursor] = {}
        self.tallies: dict[str, tuple[Shard, _Tally]] = {}
        self.skipped, self.skipped_total = Counter(), Counter()

    def batches(self, shares: Iterator[list[Slot]]) -> Iterator[tuple[list[Slot], list[dict | None]]]:
        ahead: deque[list[Slot]] = deque()
        upcoming = iter(shares)
        while True:
            share = ahead.popleft() if ahead else next(upcoming, None)
            if share is None:
                return
            for chunk in sorted({slot.position // self.chunk for slot in share} - self.read_chunks):
                # every batch of this worker with samples in the chunk: its shards are read once
                while not (ahead and ahead[-1] and self._first(ahead[-1]) // self.chunk > chunk):
                    later = next(upcoming, None)
                    if later is None:
                        break
                    ahead.append(later)
                self._read(sorted(slot.index for part in (share, *ahead) for slot in part
                                  if slot.position // self.chunk == chunk))
                self.read_chunks.add(chunk)
            samples = [self.cache.pop(slot.index, None) for slot in share]
            if not ahead:
                later = next(upcoming, None)
                if later is None:  # the last batch: what the open shards found goes out with it
                    self.close()
                else:
                    ahead.append(later)
            yield share, samples

    @staticmethod
    def _first(share: list[Slot]) -> int:
        return min(slot.position for slot in share)

    def _read(self, indices: list[int]) -> None:
        """Read these unshuffled indices: one forward cursor per (shard entry, region)."""
        by_cursor: dict[tuple[int, int], dict[int, int]] = {}
        for index in indices:
            entry, offset = self.seq.locate(index)
            by_cursor.setdefault((entry, self.seq.region_of(index)), {})[offset] = index
        for key in set(self.cursors) - set(by_cursor):  # its region has moved past this shard
            self.cursors.pop(key).close()
        for key, offsets in sorted(by_cursor.items()):
            cursor = self.cursors.get(key)
            if cursor is None or cursor.next_index > min(offsets):  # new, or asked to go back
                if cursor is not None:
                    cursor.close()
                cursor = self.cursors[key] = _Cursor(self, self.seq.shards[key[0]], min(offsets))
            for offset, sample in cursor.take(offsets).items():
                self.cache[offsets[offset]] = sample

    def read_one(self, seq: GlobalSequence, index: int) -> dict | None:
        """Sample `index` of `seq`'s concatenated shards (a refill); None where its shard no longer holds it."""
        entry, offset = seq.locate(index)
        return next(iter(self.samples(seq.shards[entry], offset, offset + 1, None, tally=False)), None)

    def samples(self, shard: Shard, start: int, stop: int, wanted, tally: bool = True) -> Iterator[dict]:
        """Samples [start, stop) of a shard (those in `wanted`); the readable ones when it is defective
        (training). What they hold is tallied per shard (unless not `tally`: a refill's extra read) for
        the shard's defect line: at once for a defect, at the end of the worker's epoch for findings."""
        if tally:
            found = self.tallies.setdefault(shard.url, (shard, _Tally(judge_from=min(shard.size, NO_USABLE_READ))))[1]
        else:
            found = _Tally()
        stream = self.stream
        try:
            for sample in iter_tar_samples(shard.url, start, stop, shard.size if stop >= shard.size else None,
                                           stream.cfg.max_member_bytes, wanted):
                found.add(sample, unusable(sample, stream.decoder))
                yield sample
        except ShardError as e:
            if not stream.cfg.reads_past_defects:
                raise
            self.defects.add(shard, found, e)

    def decode(self, sample: dict | None, count: bool):
        """The decoded item, or None (a missing sample, or unusable: counted by reason when `count`)."""
        if sample is None:
            return None
        reason = unusable(sample, self.stream.decoder)
        skipped = self.skipped if count else Counter()
        item = self.stream.decoder.decode(sample, skipped) if reason is None else None
        if reason is not None and count:
            skipped[reason] += 1
        if count:
            self.skipped_total.update(skipped)
        return item

    def take_skipped(self) -> Counter:
        taken, self.skipped = self.skipped, Counter()
        return taken

    def close(self) -> None:
        """The end of this worker's epoch: close the shards, and hand the findings to the defect lines."""
        for cursor in self.cursors.values():
            cursor.close()
        self.cursors.clear()
        for shard, found in self.tallies.values():
            self.defects.add(shard, found)
        self.tallies.clear()


class _Cursor:
    """An open shard read forward from `start`: `take` hands out the samples asked for, reading only
    theirs (the shard's end checks run when it is read to its end)."""

    def __init__(self, reader: _WindowReader, shard: Shard, start: int):
        self.wanted: set[int] = set()
        self.samples = reader.samples(shard, start, shard.size, self.wanted)
        self.next_index = start

    def take(self, offsets) -> dict[int, dict]:
        self.wanted.update(offsets)
        got: dict[int, dict] = {}
        last = max(offsets)
        while self.next_index <= last:
            sample = next(self.samples, None)
            if sample is None:  # the shard ended (cut short: the rest are missing)
                self.next_index = last + 1
                break
            self.next_index = sample["__index__"] + 1
            got[sample["__index__"]] = sample
        self.wanted.difference_update(offsets)
        return got

    def close(self) -> None:
        self.samples.close()


def unusable(sample: dict, decoder) -> str | None:
    """Why a raw sample cannot be used (a reason counted in `skipped`), or None. Cheap: member keys and
    a UTF-8 check of the caption, nothing decoded."""
    return OVERSIZED if TOO_LARGE in sample else decoder.reject(sample)


@dataclass
class _Tally:
    """What a worker's reads of a shard met this epoch: samples, the unusable ones by reason, the first
    too-large member."""

    judge_from: int = 1  # samples read before a shard can be called unusable
    samples: int = 0
    unusable: Counter = field(default_factory=Counter)
    first_too_large: str | None = None

    def add(self, sample: dict, reason: str | None) -> None:
        self.samples += 1
        if reason is not None:
            self.unusable[reason] += 1
        if reason == OVERSIZED and self.first_too_large is None:
            self.first_too_large = f"{sample['__key__']}: {too_large(sample)}"

    def findings(self) -> tuple[int, list[str]]:
        """The samples worth a defect line (too large, or all unusable) and what to say about them."""
        said, lost = [], 0
        if self.samples >= max(self.judge_from, 1) and sum(self.unusable.values()) == self.samples:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.unusable.items()))
            said.append(f"none of the {self.samples} samples read is usable ({reasons}); check the "
                        "caption/image keys or re-create it")
            lost = self.samples
        elif self.unusable[OVERSIZED]:
            lost = self.unusable[OVERSIZED]
        if self.unusable[OVERSIZED]:
            said.append(f"samples with a member over the size limit: {self.unusable[OVERSIZED]} skipped (first "
                        f"{self.first_too_large}; raise data.max_member_bytes to keep them)")
        return lost, said


class _Defects:
    """The defective shards a worker met this epoch, each recorded once, handed to the main process
    with the next batch's meta."""

    def __init__(self, epoch: int):
        self.epoch, self.pending, self.seen = epoch, [], set()

    def add(self, shard: Shard, tally: _Tally, e: ShardError | None = None) -> None:
        lost, said = tally.findings()
        if (e is None and not said) or shard.url in self.seen:  # resampled mode draws a shard many times
            return
        self.seen.add(shard.url)
        if e is not None:
            problem, samples, message = e.problem, e.samples, "; ".join([str(e), *said])
            missing = None if shard.size is None else max(0, shard.size - e.samples) + lost
        else:
            problem = OVERSIZED if tally.unusable[OVERSIZED] else NO_USABLE
            samples, missing, message = tally.samples, lost, f"shard {shard.url}: " + "; ".join(said)
        self.pending.append({"epoch": self.epoch, "shard": shard.url, "problem": problem,
                             "samples": samples, "missing": missing, "message": message})

    def take(self) -> list[dict]:
        taken, self.pending = self.pending, []
        return taken

    def summary(self) -> str:
        names = sorted(self.seen)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more if names else "none"
