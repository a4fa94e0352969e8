"""`prepare` end to end: enumerate sources -> (download) -> process in workers -> split, dedupe,
write shards -> sizes.json, stats.json, failures.jsonl, dataset.json.

Results are consumed in input order whatever the worker count, so shards are byte-identical for
any --workers. The consumer is the only writer; it checkpoints after every finished shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

import mmpretrain
from mmpretrain.errors import SampleError, UserError
from mmpretrain.fileio import writing
from mmpretrain.prepare.fetch import FetchOptions, fetch, ordered_map
from mmpretrain.prepare.images import ImageOptions
from mmpretrain.prepare.labels import LabelMap
from mmpretrain.prepare.samples import Result, process_image_input, process_text_input, sample_key
from mmpretrain.prepare.sources import (
    MANIFESTS,
    ColumnOptions,
    Input,
    ReadOptions,
    class_names,
    detect_kind,
    iter_inputs,
    manifest_label_names,
)
from mmpretrain.prepare.text import TextOptions, iter_text_inputs
from mmpretrain.shards.layout import DATASET, FAILURES, SIZES, SPLITS, STATS
from mmpretrain.shards.writer import ShardSequence, atomic_write

OUTPUT_FILES = (SIZES, STATS, FAILURES, DATASET)
WORK_DIR = ".prepare"  # resume state lives here until the run completes


@dataclass(frozen=True)
class PrepareOptions:
    out: str
    name: str | None = None
    format: str | None = None
    text_only: bool = False
    columns: ColumnOptions = field(default_factory=ColumnOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    text: TextOptions = field(default_factory=TextOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    shard_size: int = 10_000
    max_shard_bytes: int = 0
    val_fraction: float = 0.01
    dedupe: bool = False
    follow_symlinks: bool = False
    # How the work is run, not what it produces: left out of the fingerprint.
    workers: int = 1
    threads: int = 16
    in_flight: int = 0  # downloads running or done and waiting for an earlier one; 0: 32 * threads
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self, sources: list[str]) -> str:
        settings = asdict(self)
        for key in ("workers", "threads", "in_flight", "overwrite", "progress"):
            settings.pop(key)
        settings.pop("fetch")
        blob = json.dumps({"settings": settings, "sources": sources}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Tally:
    """Counts by split and outcome; inputs = written + failed + deduplicated for every split."""

    counts: dict = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    reasons: Counter = field(default_factory=Counter)

    def to_state(self) -> dict:
        return {"counts": {s: dict(c) for s, c in self.counts.items()}, "reasons": dict(self.reasons)}

    @classmethod
    def from_state(cls, state: dict) -> Tally:
        tally = cls()
        for split, counts in state["counts"].items():
            tally.counts[split].update(counts)
        tally.reasons.update(state["reasons"])
        return tally


def run_prepare(sources: list[str], opts: PrepareOptions) -> dict:
    """Returns the stats dict (also written to stats.json)."""
    out = Path(opts.out).resolve()
    plan = _plan(sources, opts, out)
    fingerprint = plan["fingerprint"] = opts.fingerprint([str(p) for p in plan["resolved"]])
    if _already_complete(out, fingerprint, opts.overwrite):
        return json.loads((out / STATS).read_text())
    # After the check above: on a 1e8-row CSV the pass over the label column takes minutes
    # (1.2 s per 1e6 rows, measured), which a run with nothing to do should not wait for.
    plan["classes"], plan["named"] = _classes(sources, plan["kinds"], opts)
    state = _start(out, fingerprint, opts.overwrite)
    run = _Run(out, opts, plan, state)
    return run.execute()


def _plan(sources: list[str], opts: PrepareOptions, out: Path) -> dict:
    if not sources:
        raise UserError("prepare needs at least one SOURCE (a folder, manifest, tar pattern or text file)")
    kinds = [opts.format or detect_kind(s, opts.text_only) for s in sources]
    for source, kind in zip(sources, kinds):
        _check_kind(source, kind)
    if opts.text_only and opts.format not in (None, "text"):
        raise UserError(f"--text-only reads text sources; --format {opts.format} does not apply")
    resolved = []
    for source in sources:
        path = Path(source).resolve()
        resolved.append(path if path.exists() else source)
        if path.exists() and path.is_dir() and (out == path or path in out.parents):
            raise UserError(f"output {opts.out} lies inside source {source}; choose an output folder outside it")
    plan = {"sources": sources, "kinds": kinds, "resolved": resolved, "classes": _folder_classes(sources, kinds),
            "named": [False] * len(sources)}  # the label columns are read by _classes, once this passes
    for source, kind, stream in zip(sources, kinds, _streams(plan, opts)):
        # Reading the first input checks columns and patterns before anything is written.
        if next(stream, None) is None:
            raise UserError(f"source {source} holds no inputs (read as {kind}); check the path or --format")
    return plan


def _classes(sources: list[str], kinds: list[str], opts: PrepareOptions) -> tuple[list[str], list[bool]]:
    """(the dataset's class names, whether each source's labels are names): class folders' names and
    manifest label columns of names (prepare.labels), sorted together, or --classnames in its order."""
    folders = _folder_classes(sources, kinds)
    found, named = set(folders), []
    for source, kind in zip(sources, kinds):
        names = manifest_label_names(Path(source), kind, opts.columns) if kind in MANIFESTS else None
        named.append(names is not None)
        found.update(names or ())
    given = list(opts.columns.classnames)
    if not given:
        return sorted(found), named
    # Only a class folder missing from the file stops the run: a manifest's unknown name is one
    # row's `unknown_label` failure.
    if missing := sorted(set(folders) - set(given)):
        raise UserError(f"class folder {missing[0]!r} is not in the --classnames file; add it or drop --classnames")
    return given, named


def _folder_classes(sources: list[str], kinds: list[str]) -> list[str]:
    """The class-folder sources' class names, sorted: a class-folder tree's labels."""
    return sorted({c for s, k in zip(sources, kinds) if k == "classes" for c in class_names(s)})


def _check_kind(source: str, kind: str) -> None:
    """A --format that contradicts what the path is (a folder read as CSV) is the user's to fix."""
    path = Path(source)
    if not path.exists():
        if kind != "wds":
            raise UserError(f"source {source} does not exist; check the path")
        return
    wants_folder = kind in ("folder", "classes")
    if wants_folder != path.is_dir() and kind not in ("wds", "text"):
        what = "a folder" if path.is_dir() else "a file"
        raise UserError(f"source {source} is {what}, which --format {kind} cannot read; drop --format or fix it")


def _streams(plan: dict, opts: PrepareOptions) -> list[Iterator[Input]]:
    if opts.text_only:
        return [iter_text_inputs(s, opts.text) for s in plan["sources"]]
    read = ReadOptions(follow_symlinks=opts.follow_symlinks, max_member_bytes=opts.fetch.max_bytes)
    classes, given = plan["classes"], opts.columns.classnames
    by_name = LabelMap(index={name: i for i, name in enumerate(classes)})
    by_number = LabelMap(count=len(given) if given else None)
    return [iter_inputs(s, k, opts.columns, classes, read, by_name if named else by_number)
            for s, k, named in zip(plan["sources"], plan["kinds"], plan["named"])]


def _already_complete(out: Path, fingerprint: str, overwrite: bool) -> bool:
    dataset = out / DATASET
    if overwrite or not dataset.is_file():
        return False
    done = json.loads(dataset.read_text()).get("fingerprint")
    if done != fingerprint:
        raise UserError(
            f"{out} already holds a dataset prepared from other sources or settings; "
            "pass --overwrite to replace it or choose another --out"
        )
    print(f"{out} is already complete for these sources and settings; nothing to do", file=sys.stderr)
    return True


def _start(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """Returns the saved resume state, or None for a fresh start (after clearing our own files)."""
    work = out / WORK_DIR
    state_file = work / "state.json"
    if overwrite:
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    elif state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != fingerprint:
            raise UserError(
                f"{out} holds an unfinished run with other sources or settings; "
                "re-run that command to resume it, or pass --overwrite to start over"
            )
        return state
    elif any((out / split).exists() for split in SPLITS):
        raise UserError(f"{out} already holds shards; pass --overwrite to replace them or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    return None


class _Run:
    def __init__(self, out: Path, opts: PrepareOptions, plan: dict, state: dict | None):
        self.out, self.opts, self.plan = out, opts, plan
        self.work = out / WORK_DIR
        name = opts.name or out.name
        self.splits = {
            s: ShardSequence(out / s, name, opts.shard_size, opts.max_shard_bytes) for s in SPLITS
        }
        self.failures_path = self.work / FAILURES
        self.hashes_path = self.work / "hashes.txt"
        self.tally, self.seen, self.resume_from, self.replay = Tally(), set(), 0, set()
        self.elapsed_before = 0.0
        if state is not None:
            self._restore(state)
        else:
            self.failures_path.write_bytes(b"")
            self.hashes_path.write_bytes(b"")
        for seq in self.splits.values():
            seq.clean_stale()
        # unbuffered: a write that fails on a full disk fails where it is made, and close() cannot fail again
        self.failures = open(self.failures_path, "ab", buffering=0)  # noqa: SIM115 - closed in execute
        self.started = time.time()
        if state is None:
            self._checkpoint(0)  # from here on a re-run resumes instead of refusing a non-empty --out

    def _restore(self, state: dict) -> None:
        self.tally = Tally.from_state(state["tally"])
        self.resume_from = state["next_index"]
        self.elapsed_before = state.get("elapsed", 0.0)
        for split, seq in self.splits.items():
            seq.load_state(state["splits"][split])
            self.replay.update(index for index, _ in state["splits"][split]["pending"])
        for path, size in ((self.failures_path, state["failures_bytes"]), (self.hashes_path, state["hashes_bytes"])):
            with open(path, "r+b") as fh:
                fh.truncate(size)
        if self.opts.dedupe:
            self.seen = set(self.hashes_path.read_text().split())

    def execute(self) -> dict:
        bar = tqdm(desc="prepare", unit="sample", disable=None if self.opts.progress else True, dynamic_ncols=True)  # None: off when not a terminal
        try:
            for result in self._results():
                self._consume(result)
                bar.update(1)
                if result.reason:
                    bar.set_postfix(failed=sum(c["failed"] for c in self.tally.counts.values()), refresh=False)
            for seq in self.splits.values():
                seq.finish()
        except BaseException:
            for seq in self.splits.values():
                seq.abandon()
            raise
        finally:
            bar.close()
            self.failures.close()
        return self._finalise()

    # -- producing results, in input order ---------------------------------------------------
    def _inputs(self) -> Iterator[Input]:
        for index, inp in enumerate(itertools.chain.from_iterable(_streams(self.plan, self.opts))):
            if index >= self.resume_from or index in self.replay:
                inp.index = index
                yield inp

    def _results(self) -> Iterator[Result]:
        inputs = self._inputs()
        if self.opts.text_only:
            return map(process_text_input, inputs)
        # Even one worker is a separate process: the main process reads, downloads and writes tars
        # meanwhile (measured: tar writing is 7% of a 64 px sample when done in series).
        work = partial(process_image_input, opts=self.opts.image)
        return _pool_map(work, inputs, self.opts.workers, self._download)

    def _download(self, inputs: Iterable[Input]) -> Iterator[Input]:
        if not any(k in MANIFESTS for k in self.plan["kinds"]):
            return iter(inputs)
        window = self.opts.in_flight or 32 * self.opts.threads
        return ordered_map(partial(_fetch_input, options=self.opts.fetch), inputs, self.opts.threads, window)

    # -- consuming results -------------------------------------------------------------------
    def _consume(self, result: Result) -> None:
        split = "val" if _hash_fraction(result.digest) < self.opts.val_fraction else "train"
        counts = self.tally.counts[split]
        if result.index not in self.replay:
            counts["inputs"] += 1
        if not result.ok:
            counts["failed"] += 1
            self.tally.reasons[result.reason] += 1
            record = {"source": result.source, "reason": result.reason, "detail": result.detail, "split": split}
            with writing(self.failures_path):
                self.failures.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            return
        if self.opts.dedupe:
            if result.digest in self.seen:
                counts["deduplicated"] += 1
                return
            self.seen.add(result.digest)
        finished = self.splits[split].add(sample_key(result.index), result.members, result.index, result.digest)
        if finished:
            with writing(self.hashes_path), open(self.hashes_path, "a") as fh:
                fh.writelines(f"{digest}\n" for _, digest in finished)
            self._checkpoint(result.index + 1)

    def _checkpoint(self, next_index: int) -> None:
        state = {
            "fingerprint": self.plan["fingerprint"],
            "next_index": next_index,
            "splits": {s: seq.to_state() for s, seq in self.splits.items()},
            "tally": self.tally.to_state(),
            "failures_bytes": self.failures_path.stat().st_size,
            "hashes_bytes": self.hashes_path.stat().st_size,
            "elapsed": self.elapsed_before + time.time() - self.started,
        }
        atomic_write(self.work / "state.json", json.dumps(state))

    # -- the final files ---------------------------------------------------------------------
    def _finalise(self) -> dict:
        elapsed = self.elapsed_before + time.time() - self.started
        by_split = {}
        for split, seq in self.splits.items():
            counts = self.tally.counts[split]
            counts["written"] = sum(seq.sizes.values())
            seq.write_sizes()
            by_split[split] = {k: counts[k] for k in ("inputs", "written", "failed", "deduplicated")}
            by_split[split]["shards"] = len(seq.sizes)
        total = sum(c["inputs"] for c in by_split.values())
        stats = {
            "splits": by_split,
            "inputs": total,
            "written": sum(c["written"] for c in by_split.values()),
            "failed": sum(c["failed"] for c in by_split.values()),
            "deduplicated": sum(c["deduplicated"] for c in by_split.values()),
            "reasons": dict(sorted(self.tally.reasons.items())),
            "elapsed_s": round(elapsed, 3),
            "samples_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
            "settings": _settings(self.opts),
        }
        atomic_write(self.out / STATS, json.dumps(stats, indent=2) + "\n")
        self.failures_path.replace(self.out / FAILURES)
        atomic_write(self.out / DATASET, json.dumps(self._dataset_info(), indent=2, ensure_ascii=False) + "\n")
        shutil.rmtree(self.work, ignore_errors=True)
        return stats

    def _dataset_info(self) -> dict:
        plan = self.plan
        return {
            "name": self.opts.name or self.out.name,
            "kind": "text" if self.opts.text_only else "image-text",
            "mmpretrain_version": mmpretrain.__version__,
            "command": sys.argv,
            "sources": [{"path": str(p), "kind": k} for p, k in zip(plan["resolved"], plan["kinds"])],
            "classes": plan["classes"] or None,
            "splits": {
                s: {"shards": sorted(seq.sizes), "samples": sum(seq.sizes.values())}
                for s, seq in self.splits.items() if seq.sizes
            },
            "settings": _settings(self.opts),
            "fingerprint": plan["fingerprint"],
        }


def _settings(opts: PrepareOptions) -> dict:
    return json.loads(json.dumps(asdict(opts), default=str))


def _hash_fraction(digest: str) -> float:
    """Content hash -> [0, 1): the split decision, identical for identical content."""
    return int(digest[:16], 16) / 2**64


def _fetch_input(inp: Input, options: FetchOptions) -> Input:
    if inp.error is None and inp.is_url:
        try:
            inp.data = fetch(inp.image, options)
        except SampleError as e:
            inp.error = (e.reason, e.detail)
    return inp


def _pool_map(fn, inputs: Iterable[Input], workers: int, feed) -> Iterator[Result]:
    """Ordered parallel map with a bounded window (Pool.imap would queue the whole input stream).
    The pool forks before the download threads start."""
    chunk, window = 16, 4 * workers
    with mp.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        batches = _batched(feed(inputs), chunk)
        for batch in batches:
            pending.append(pool.apply_async(_run_batch, (fn, batch)))
            if len(pending) >= window:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _run_batch(fn, batch: list) -> list:
    return [fn(item) for item in batch]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
