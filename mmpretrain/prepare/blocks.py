"""Blocks: the unit of work of `prepare`, whatever runs it (one process, Slurm array parts, Ray).

Block b is the inputs at stream positions [b * shard_size, (b + 1) * shard_size). Its outcome is a
function of those inputs alone, so any machine can make it, in any order, any number of times:

    OUT/train/NAME-{b:06d}.tar           its train samples (NAME-{b:06d}_1.tar ... when a byte cap cuts it)
    OUT/.prepare/val/{b:06d}.tar         its val samples: finalize packs these into full val shards
    OUT/.prepare/failures/{b:06d}.jsonl  one line per input of the block that did not make it
    OUT/.prepare/blocks/{b:06d}.json     its summary, written last: the block is done once it exists

The work area also holds plan.json (the run's fingerprint: parts of another command are refused),
inputs.json (how many inputs the sources hold, written by whoever read them to the end) and, while
a part finalizes, finalizing.json (created only if absent, so parts that finish together finalize
once).
Everything is written through `storage`, so OUT may be a local folder or an object-store URL, and
each file appears only when complete.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mmpretrain import storage
from mmpretrain.prepare.samples import Result
from mmpretrain.shards.format import sample_key
from mmpretrain.shards.layout import SPLITS
from mmpretrain.shards.writer import ShardSequence, block_names

WORK_DIR = ".prepare"
PLAN = "plan.json"
INPUTS = "inputs.json"
FINALIZING = "finalizing.json"  # created by the one part that writes the dataset files
OUTCOMES = ("inputs", "written", "failed", "deduplicated")


def work_url(out: str, *parts: str) -> str:
    return storage.join(out, WORK_DIR, *parts)


def block_file(kind: str, block: int) -> str:
    """A block's file in the work area: kind "blocks" (summary), "val" or "failures"."""
    ext = {"blocks": "json", "val": "tar", "failures": "jsonl"}[kind]
    return f"{block:06d}.{ext}"


def done_blocks(out: str) -> set[int]:
    """The blocks whose summary exists (listed once: one request on object storage)."""
    names = storage.listdir(work_url(out, "blocks"))
    return {int(n[:-len(".json")]) for n in names if n.endswith(".json") and n[:-len(".json")].isdigit()}


def read_summaries(out: str, blocks: Iterable[int]) -> Iterator[dict]:
    """The summaries of done blocks, in the order given (fetched many at once from object storage)."""
    urls = [work_url(out, "blocks", block_file("blocks", b)) for b in blocks]
    return (json.loads(data) for data in storage.read_many(urls))


def split_of(digest: str, val_fraction: float) -> str:
    """Content hash -> split: identical content lands on the same side, on every machine."""
    return "val" if int(digest[:16], 16) / 2**64 < val_fraction else "train"


@dataclass
class BlockWriter:
    """The results of one block, consumed in input order, into the block's files.

    `seen` maps an image digest to the first block it was written in, over everything this process
    has seen (the earlier blocks of a sequential run, and the summaries of done blocks): a later
    copy is dropped here at once. Copies this process could not see (another part's earlier block)
    are dropped by finalize, from the digests the summaries list."""

    out: str
    name: str
    block: int
    val_fraction: float
    max_shard_bytes: int = 0
    dedupe: bool = False
    seen: dict[str, int] | None = None
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.counts = {s: Counter({k: 0 for k in OUTCOMES}) for s in SPLITS}
        self.reasons: Counter = Counter()
        self.failures: list[bytes] = []
        self.digests: dict[str, list[str]] = {s: [] for s in SPLITS}  # of the written samples, in order
        self._here: set[str] = set()
        if self.seen is None:
            self.seen = {}
        self.train = ShardSequence(storage.join(self.out, "train"), block_names(self.name, self.block),
                                   None, self.max_shard_bytes)
        self.val = ShardSequence(work_url(self.out, "val"), lambda k: block_file("val", self.block))

    def add(self, result: Result) -> None:
        split = split_of(result.digest, self.val_fraction)
        counts = self.counts[split]
        counts["inputs"] += 1
        if not result.ok:
            counts["failed"] += 1
            self.reasons[result.reason] += 1
            record = {"source": result.source, "reason": result.reason, "detail": result.detail, "split": split}
            self.failures.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            return
        if self.dedupe:
            first = self.seen.get(result.digest, self.block)
            if first < self.block or result.digest in self._here:
                counts["deduplicated"] += 1
                return
            self._here.add(result.digest)
            self.seen[result.digest] = min(first, self.block)
            self.digests[split].append(result.digest)
        counts["written"] += 1
        sequence = self.train if split == "train" else self.val
        sequence.add(sample_key(result.index), result.members)

    def finish(self) -> dict:
        """Close the block's files, then write its summary (the mark that the block is done)."""
        train_sizes = self.train.finish()
        self.val.finish()
        storage.write_bytes(work_url(self.out, "failures", block_file("failures", self.block)), b"".join(self.failures))
        summary = {
            "block": self.block,
            "splits": {s: dict(c) for s, c in self.counts.items()},
            "reasons": dict(sorted(self.reasons.items())),
            "shards": train_sizes,
            "started": self.started,
            "finished": time.time(),
        }
        if self.dedupe:
            summary["digests"] = self.digests
        storage.write_bytes(work_url(self.out, "blocks", block_file("blocks", self.block)), json.dumps(summary))
        return summary

    def abandon(self) -> None:
        """On error or interrupt: drop the open shards; the block stays undone."""
        self.train.abandon()
        self.val.abandon()

