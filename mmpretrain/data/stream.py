"""The per-worker sample stream: plan -> raw samples -> seeded shuffle -> skip/validate -> batches.

Everything before decoding works on raw member bytes, so resuming skips consumed samples without
decoding them: a worker replays its raw stream (same shards, same shuffle) and drops the first
`position` outputs. All randomness is drawn from generators seeded by (seed, purpose, epoch, rank,
worker[, batch]); no global RNG leaks in or out.

A defective shard (cut short, gone, or holding fewer samples than sizes.json lists: shards.reader)
does not stop training: its readable samples are used, the slots it leaves are refilled, and each
batch's meta carries the defects its worker met (once per shard and epoch) to the main process, where
the trainer logs them. Evaluation (drop_last=False, every sample exactly once) stops on one instead.
Two findings in a readable shard make a defect line too: samples with a member over
`max_member_bytes` (each a counted "too_large" skip; no member is read before its size is known), and
a shard none of whose samples read is usable (no captions: open_clip #569). Other unusable samples
are only counted, by reason: img2dataset's LAION shards hold a few empty captions in most shards, and
a warning per shard and epoch would bury the ones that matter.

A user error in a DataLoader worker travels to the main process in the batch meta and is raised
there as it was: DataLoader's own re-raise would put the worker's traceback into its message.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset, get_worker_info

from mmpretrain.config import DataMode, choices
from mmpretrain.data.plan import (
    WorkerPlan,
    batches_per_rank,
    consumed_by_worker,
    derive_seed,
    epoch_plan,
    worker_block,
)
from mmpretrain.errors import UserError
from mmpretrain.shards.reader import MAX_MEMBER_BYTES, TOO_LARGE, ShardError, iter_tar_samples, too_large
from mmpretrain.shards.resolve import Shard, ShardSource

# Resampled mode gives up when this many samples in a row were unusable (all shards bad), or when
# this many shards drawn in a row held no readable sample.
MAX_CONSECUTIVE_BAD = 100_000
MAX_EMPTY_DRAWS = 1000

# The problems a defect line names besides the reader's ShardError ones (metrics.jsonl "data" lines).
OVERSIZED = "too_large"  # samples with a member over max_member_bytes (also their skip reason)
NO_USABLE = "no_usable_samples"  # every sample read from the shard was unusable


@dataclass(frozen=True)
class StreamConfig:
    shards: tuple[ShardSource, ...]
    batch_size: int
    mode: str = "epoch"  # "epoch": one pass, no sample twice; "resampled": shards drawn with replacement
    seed: int = 0
    shuffle: bool = True  # shard order and the sample buffer
    shuffle_buffer: int = 1000
    drop_last: bool = True  # False (evaluation): every sample once, last batches may be short
    samples_per_epoch: int | None = None  # resampled: length of a (virtual) epoch; default: all samples
    max_member_bytes: int | None = MAX_MEMBER_BYTES  # larger members make a "too_large" skip; None: no limit

    @property
    def reads_past_defects(self) -> bool:
        """Training reads on past a defective shard; evaluation's numbers would be wrong without it."""
        return self.drop_last or self.mode == "resampled"


@dataclass
class Position:
    """Where a loader stands: batches delivered this epoch, and per worker its raw-stream position."""

    epoch: int = 0
    batches: int = 0
    raw: dict[int, int] = field(default_factory=dict)


class ShardStream(IterableDataset):
    """Yields whole batches (DataLoader batch_size=None). `decoder` turns raw samples into items and
    items into a batch; it is the only part that knows about images or text."""

    def __init__(self, cfg: StreamConfig, shards: list[Shard], decoder, rank: int = 0, world: int = 1):
        if cfg.mode not in choices(DataMode):
            raise UserError(f"data mode must be one of {', '.join(choices(DataMode))}, got '{cfg.mode}'")
        self.cfg, self.shards, self.decoder, self.rank, self.world = cfg, shards, decoder, rank, world
        self.position = Position()

    # -- sizes -------------------------------------------------------------------------------
    def total_samples(self) -> int:
        if self.cfg.mode == "resampled" and self.cfg.samples_per_epoch:
            return self.cfg.samples_per_epoch
        if any(s.size is None for s in self.shards):
            raise UserError("resampled mode over shards without sample counts needs samples_per_epoch")
        return sum(s.size for s in self.shards)

    def batches_per_epoch(self) -> int:
        drop_last = self.cfg.drop_last or self.cfg.mode == "resampled"
        return batches_per_rank(self.total_samples(), self.world, self.cfg.batch_size, drop_last)

    # -- iteration (runs in each DataLoader worker) ------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        pos = self.position
        num_workers = info.num_workers if info else 1
        # DataLoader always starts its round-robin at worker 0; after a resume at rank batch c the
        # next batch belongs to worker c % W, so DataLoader worker i plays worker (i + c) % W.
        worker = ((info.id if info else 0) + pos.batches) % num_workers
        plan = self._plan(worker, num_workers)
        done = min(plan.batches, consumed_by_worker(pos.batches, worker, num_workers))
        defects = _Defects(pos.epoch)
        try:
            raw = _RawStream(self._raw(plan, worker, defects), self.decoder, pos.raw.get(worker, 0))
            for j in range(done, plan.batches):
                size = self._batch_size(plan, j)
                items = self._fill(raw, size, defects)
                seed = derive_seed(self.cfg.seed, "batch", pos.epoch, self.rank, worker, j)
                batch = self.decoder.collate(items, seed)
                # (batch, meta): where the worker stands travels beside the typed batch record
                yield batch, {"worker": worker, "raw": raw.position, "skipped": dict(raw.take_skipped()),
                              "defects": defects.take()}
        except UserError as e:
            if info is None:
                raise
            yield None, {"error": e}  # Loader raises it in the main process, its one line intact

    def _plan(self, worker: int, num_workers: int) -> WorkerPlan:
        cfg = self.cfg
        if cfg.mode == "epoch":
            return epoch_plan(
                self.shards, seed=cfg.seed, epoch=self.position.epoch, rank=self.rank, world=self.world,
                worker=worker, num_workers=num_workers, batch_size=cfg.batch_size,
                drop_last=cfg.drop_last, shuffle=cfg.shuffle,
            )
        first, count = worker_block(self.batches_per_epoch(), worker, num_workers)
        return WorkerPlan(count, first, (), count * cfg.batch_size)

    def _batch_size(self, plan: WorkerPlan, j: int) -> int:
        return max(0, min(self.cfg.batch_size, plan.samples - j * self.cfg.batch_size))

    def _raw(self, plan: WorkerPlan, worker: int, defects: _Defects) -> Iterator[dict]:
        cfg, epoch = self.cfg, self.position.epoch
        if cfg.mode == "epoch":
            samples = (s for seg in plan.segments for s in self._read(seg.shard, defects, seg.start, seg.stop))
        else:
            samples = self._resampled(derive_seed(cfg.seed, "resample", epoch, self.rank, worker), defects)
        if not cfg.shuffle or cfg.shuffle_buffer <= 1:
            return samples
        return shuffled(samples, cfg.shuffle_buffer, derive_seed(cfg.seed, "buffer", epoch, self.rank, worker))

    def _read(self, shard: Shard, defects: _Defects, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Samples [start, stop) of a shard; the readable ones when it is defective (training). The
        unusable ones are tallied for the shard's defect line."""
        tally = _Tally()
        try:
            for sample in iter_tar_samples(shard.url, start, stop, shard.size, self.cfg.max_member_bytes):
                tally.add(sample, unusable(sample, self.decoder))
                yield sample
        except ShardError as e:
            if not self.cfg.reads_past_defects:
                raise
            defects.add(shard, tally, e)
            return
        defects.add(shard, tally)

    def _resampled(self, seed: int, defects: _Defects) -> Iterator[dict]:
        """Shards drawn with replacement; a source's share of samples follows its weight."""
        rng = random.Random(seed)
        by_source: dict[int, list[Shard]] = {}
        for shard in self.shards:
            by_source.setdefault(shard.source, []).append(shard)
        sources = sorted(by_source)
        weights = [self.cfg.shards[s].weight / _mean_size(by_source[s]) for s in sources]
        empty_draws = 0
        while empty_draws < MAX_EMPTY_DRAWS:
            source = rng.choices(sources, weights)[0]
            empty_draws += 1
            for sample in self._read(rng.choice(by_source[source]), defects):
                empty_draws = 0
                yield sample
        raise UserError(f"the last {MAX_EMPTY_DRAWS} shards drawn held no readable sample (rank {self.rank}; "
                        f"defective shards met: {defects.summary()}); check the shards with `mmpretrain inspect`")

    def _fill(self, raw: _RawStream, size: int, defects: _Defects) -> list:
        items: list = []
        bad_in_a_row = 0
        while len(items) < size:
            sample = raw.next_usable()
            item = None if sample is None else self.decoder.decode(sample, raw.skipped)
            if item is not None:
                items.append(item)
                bad_in_a_row = 0
                continue
            bad_in_a_row += 1
            if sample is None or bad_in_a_row > MAX_CONSECUTIVE_BAD:
                raise UserError(
                    f"no usable samples left for rank {self.rank} (skipped: {dict(raw.skipped_total)}; "
                    f"defective shards met: {defects.summary()}); check that the shards exist and hold "
                    "images and captions under the configured keys (`mmpretrain inspect`)"
                )
        return items


def _mean_size(shards: list[Shard]) -> float:
    known = [s.size for s in shards if s.size]
    return sum(known) / len(known) if known else 1.0


def unusable(sample: dict, decoder) -> str | None:
    """Why a raw sample cannot be used (a reason counted in `skipped`), or None. Cheap: member keys and
    a UTF-8 check of the caption, nothing decoded."""
    return OVERSIZED if TOO_LARGE in sample else decoder.reject(sample)


@dataclass
class _Tally:
    """What one read of a shard met: samples, the unusable ones by reason, the first too-large member."""

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
        if self.samples and sum(self.unusable.values()) == self.samples:
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


class _RawStream:
    """Raw samples with a position; skips the first `skip` outputs (a resume) without decoding.
    Samples the decoder rejects cheaply are counted by reason. When the stream runs out (epoch mode
    with unusable samples) it cycles through a reserve of the first usable samples it saw, so every
    worker still delivers its full share of batches: nothing hangs on uneven or dirty shards."""

    def __init__(self, samples: Iterator[dict], decoder, skip: int, reserve_size: int = 256):
        self.samples, self.decoder, self.position = samples, decoder, 0
        self.skipped, self.skipped_total = Counter(), Counter()
        self.reserve: list[dict] = []
        self.reserve_size, self._refills = reserve_size, 0
        while self.position < skip:
            if self._next_raw()[0] is None:  # a resume past the end: the rest were refills
                self._refills += 1
                self.position += 1

    def _next_raw(self) -> tuple[dict | None, str | None]:
        """The next raw sample and why it is unusable (None: usable)."""
        sample = next(self.samples, None)
        if sample is None:
            return None, None
        self.position += 1
        reason = unusable(sample, self.decoder)
        if reason is None and len(self.reserve) < self.reserve_size:
            self.reserve.append(sample)
        return sample, reason

    def next_usable(self) -> dict | None:
        while True:
            sample, reason = self._next_raw()
            if sample is None:
                break
            if reason is None:
                return sample
            self.skipped[reason] += 1
            self.skipped_total[reason] += 1
        if not self.reserve:
            return None
        self._refills += 1
        self.position += 1
        self.skipped["refilled"] += 1
        return self.reserve[(self._refills - 1) % len(self.reserve)]

    def take_skipped(self) -> Counter:
        taken, self.skipped = self.skipped, Counter()
        return taken


def shuffled(samples: Iterator[dict], size: int, seed: int) -> Iterator[dict]:
    """A seeded shuffle buffer: fill to `size`, then emit a random slot and refill it."""
    rng = random.Random(seed)
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    rng.shuffle(buffer)
    yield from buffer

