"""Finalize: once every block is done (prepare.blocks), the dataset's own files.

Whoever runs it (a plain run at its end, the last part to finish, `prepare --finalize`, the Ray
driver) writes the same bytes: duplicates that no single process could see are dropped (the
summaries list every written sample's digest under --dedupe), the blocks' val samples are packed
into full val shards, then sizes.json per split, failures.jsonl, stats.json and dataset.json,
and the work area is removed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter

import mmpretrain
from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.prepare.blocks import (
    INPUTS,
    OUTCOMES,
    WORK_DIR,
    block_file,
    done_blocks,
    read_summaries,
    work_url,
)
from mmpretrain.shards.format import CAPTION_EXT, image_ext, member_bytes
from mmpretrain.shards.layout import DATASET, FAILURES, SIZES, SPLITS, STATS
from mmpretrain.shards.reader import iter_tar_samples
from mmpretrain.shards.writer import ShardSequence, block_names, dense_names

# Options that say how the work is run, not what it produces: left out of the fingerprint and of
# dataset.json's settings.
HOW = ("workers", "threads", "in_flight", "overwrite", "progress", "num_parts", "part", "finalize_only",
       "engine", "ray_address")


def missing_blocks(out: str) -> list[int] | None:
    """The blocks not done yet; None while nobody has read the inputs to their end."""
    if not storage.isfile(work_url(out, INPUTS)):
        return None
    total = json.loads(storage.read_text(work_url(out, INPUTS)))["blocks"]
    done = done_blocks(out)
    return [b for b in range(total) if b not in done]


def check_complete(out: str, num_parts: int | None = None) -> None:
    """A UserError saying which blocks (and parts) are missing, unless every block is done."""
    missing = missing_blocks(out)
    if missing is None:
        raise UserError(f"{out}: no part has read the sources to their end yet; run the parts "
                        "(prepare ... --num-parts N --part I), then --finalize")
    if missing:
        parts = sorted({b % num_parts for b in missing}) if num_parts else None
        which = f" (parts {', '.join(map(str, parts[:10]))}{' ...' if len(parts) > 10 else ''})" if parts else ""
        raise UserError(f"{out}: {len(missing)} block(s) not done yet, first {missing[0]}{which}; "
                        "run (or re-run) those parts, then --finalize")


def finalize(out: str, opts, plan: dict) -> dict:
    """Returns the stats dict (also written to stats.json)."""
    name = opts.name or storage.name(out)
    total = json.loads(storage.read_text(work_url(out, INPUTS)))["blocks"]
    summaries = list(read_summaries(out, range(total)))
    if opts.dedupe:
        for block, late in _late_duplicates(summaries).items():
            summaries[block] = _drop_late(out, name, summaries[block], late, opts.max_shard_bytes)
    sizes = {"train": {}, "val": _pack_val(out, name, summaries, opts)}
    for summary in summaries:
        sizes["train"].update(summary["shards"])
    for split in SPLITS:
        if sizes[split]:
            storage.write_bytes(storage.join(out, split, SIZES), json.dumps(sizes[split], indent=2) + "\n")
    _concat_failures(out, total)
    stats = _stats(summaries, sizes, opts)
    storage.write_bytes(storage.join(out, STATS), json.dumps(stats, indent=2) + "\n")
    info = _dataset_info(name, plan, sizes, opts)
    storage.write_bytes(storage.join(out, DATASET), json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    storage.remove(storage.join(out, WORK_DIR), recursive=True)
    _remove_temp_files(out, name)
    return stats


def _late_duplicates(summaries: list[dict]) -> dict[int, set[str]]:
    """{block: digests} of written samples whose image an earlier block already wrote."""
    seen: set[str] = set()
    late: dict[int, set[str]] = {}
    for summary in summaries:
        for split in SPLITS:
            for digest in summary["digests"][split]:
                if digest in seen:
                    late.setdefault(summary["block"], set()).add(digest)
                seen.add(digest)
    return late


def _drop_late(out: str, name: str, summary: dict, late: set[str], max_bytes: int) -> dict:
    """The block without its late copies: its train shards rewritten, its summary updated (counted
    as deduplicated; `val_dropped` for _pack_val). Safe to kill at any point and run again: the new
    shards are staged in the work area with a list of them written last; only then are they moved
    over the old ones, and the summary is rewritten after the moves."""
    block = summary["block"]
    staging = work_url(out, "rewrite", f"{block:06d}")
    staged_list = storage.join(staging, "staged.json")
    if not storage.isfile(staged_list):  # the old shards are all still in place
        new = ShardSequence(staging, block_names(name, block), None, max_bytes)
        for shard in summary["shards"]:
            for sample in iter_tar_samples(storage.join(out, "train", shard), max_member_bytes=None):
                members = member_bytes(sample)
                if content_digest(members) not in late:
                    new.add(sample["__key__"], members)
        storage.write_bytes(staged_list, json.dumps(new.finish()))
    sizes = json.loads(storage.read_text(staged_list))
    for shard in sizes:
        if storage.isfile(storage.join(staging, shard)):  # not moved by an earlier, killed finalize
            storage.move(storage.join(staging, shard), storage.join(out, "train", shard))
    for shard in set(summary["shards"]) - set(sizes):
        storage.remove(storage.join(out, "train", shard))
    digests = summary["digests"]
    summary = {**summary, "shards": sizes, "digests": {s: [d for d in digests[s] if d not in late] for s in SPLITS},
               "val_dropped": sorted(set(summary.get("val_dropped", []))
                                     | {i for i, d in enumerate(digests["val"]) if d in late})}
    for split in SPLITS:
        moved = len(digests[split]) - len(summary["digests"][split])
        summary["splits"][split] = {**summary["splits"][split],
                                    "written": summary["splits"][split]["written"] - moved,
                                    "deduplicated": summary["splits"][split]["deduplicated"] + moved}
    storage.write_bytes(work_url(out, "blocks", block_file("blocks", block)), json.dumps(summary))
    storage.remove(staging, recursive=True)
    return summary


def content_digest(members: dict[str, bytes]) -> str:
    """The digest prepare gave a sample (prepare.samples): sha256 of its image bytes, or of its
    text for a text-only sample."""
    data = members.get(image_ext(members)) if image_ext(members) else members[CAPTION_EXT]
    return hashlib.sha256(data).hexdigest()


def _pack_val(out: str, name: str, summaries: list[dict], opts) -> dict[str, int]:
    """The blocks' val samples, in input order, into val shards of --shard-size samples."""
    val = ShardSequence(storage.join(out, "val"), dense_names(name), opts.shard_size, opts.max_shard_bytes)
    try:
        for summary in summaries:
            dropped = set(summary.get("val_dropped", []))
            if not summary["splits"]["val"]["written"]:
                continue
            piece = work_url(out, "val", block_file("val", summary["block"]))
            for position, sample in enumerate(iter_tar_samples(piece, max_member_bytes=None)):
                if position not in dropped:
                    val.add(sample["__key__"], member_bytes(sample))
        return val.finish()
    except BaseException:
        val.abandon()
        raise


def _concat_failures(out: str, total: int) -> None:
    with storage.atomic_writer(storage.join(out, FAILURES)) as fh:
        for data in storage.read_many([work_url(out, "failures", block_file("failures", b)) for b in range(total)]):
            fh.write(data)


def _stats(summaries: list[dict], sizes: dict, opts) -> dict:
    counts = {s: Counter({k: 0 for k in OUTCOMES}) for s in SPLITS}
    reasons: Counter = Counter()
    for summary in summaries:
        for split in SPLITS:
            counts[split].update(summary["splits"][split])
        reasons.update(summary["reasons"])
    elapsed = _busy_time([(s["started"], s["finished"]) for s in summaries])
    by_split = {s: {**{k: counts[s][k] for k in OUTCOMES}, "shards": len(sizes[s])} for s in SPLITS}
    total = sum(c["inputs"] for c in by_split.values())
    return {
        "splits": by_split,
        "inputs": total,
        **{k: sum(c[k] for c in by_split.values()) for k in OUTCOMES[1:]},
        "reasons": dict(sorted(reasons.items())),
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
        "settings": settings(opts),
        "command": sys.argv,
    }


def _busy_time(spans: list[tuple[float, float]]) -> float:
    """Seconds during which some block was being made (the union of the blocks' spans): a resumed
    run does not count its pause, concurrent parts count once."""
    busy, end = 0.0, float("-inf")
    for start, finish in sorted(spans):
        if finish > end:
            busy += finish - max(start, end)
            end = finish
    return busy


def _dataset_info(name: str, plan: dict, sizes: dict, opts) -> dict:
    return {
        "name": name,
        "kind": "text" if opts.text_only else "image-text",
        "mmpretrain_version": mmpretrain.__version__,
        "sources": [{"path": str(p), "kind": k} for p, k in zip(plan["resolved"], plan["kinds"])],
        "classes": plan["classes"] or None,
        "splits": {s: {"shards": sorted(sizes[s]), "samples": sum(sizes[s].values())} for s in SPLITS if sizes[s]},
        "settings": settings(opts, how=False),
        "fingerprint": plan["fingerprint"],
    }


def settings(opts, how: bool = True) -> dict:
    """The options as JSON; without `how`, only those that decide the output (dataset.json is then
    the same bytes for a plain run, N parts, any engine and any --out; stats.json says how it ran)."""
    from dataclasses import asdict

    values = asdict(opts)
    if not how:
        for key in (*HOW, "out"):  # where it lies is where it is read from
            values.pop(key)
    return json.loads(json.dumps(values, default=str))


def _remove_temp_files(out: str, name: str) -> None:
    """Temp files of shards a killed writer left behind (a local folder only: an object store
    never shows an unfinished upload)."""
    if not storage.is_local(out):
        return
    for split in SPLITS:
        folder = storage.join(out, split)
        for entry in storage.listdir(folder):
            if entry.startswith(f".{name}-") and entry.endswith(".tmp"):
                storage.remove(storage.join(folder, entry))
