"""Shard patterns to a checked list of shards with sample counts: the one place that expands a
pattern (directories, globs, brace ranges; local paths and remote URLs alike).

Counts come from `sizes.json` beside the shards (open_clip's convention, written by `prepare`),
from img2dataset's `NNNNN_stats.json`, or, for local tars with neither, from the reader's scan of
the tar headers (no member data is read). Remote shards (`pipe:`, http) need a sizes.json given
explicitly in epoch mode, where exact per-process counts depend on them.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from braceexpand import braceexpand

from mmpretrain.errors import UserError
from mmpretrain.shards.layout import SIZES, benchmark_shards, benchmark_split, find_root, img2dataset_stats
from mmpretrain.shards.reader import count_samples, is_remote


@dataclass(frozen=True)
class ShardSource:
    """One pattern of shards and its sampling weight (its share of samples in resampled mode)."""

    pattern: str
    weight: float = 1.0
    sizes: str | None = None  # a sizes.json for remote shards


@dataclass(frozen=True)
class Shard:
    url: str
    size: int | None  # samples; None for remote shards without sizes
    source: int  # index into the list of ShardSources


def expand(pattern: str, recursive: bool = False) -> list[str]:
    """Brace notation, globs and directories (every .tar in it, or below it, sorted; a CLIP_benchmark
    folder: the shards its nshards.txt names, unless `recursive`) for local paths."""
    if is_remote(pattern):
        return list(braceexpand(pattern))
    if os.path.isdir(pattern):
        split = None if recursive else benchmark_split(Path(pattern))
        if split is not None:
            return [str(p) for p in benchmark_shards(split)]
        return sorted(str(p) for p in (Path(pattern).rglob if recursive else Path(pattern).glob)("*.tar"))
    urls: list[str] = []
    for part in braceexpand(pattern):
        urls += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    return urls


def dataset_root(pattern: str) -> Path | None:
    """The dataset folder (layout.find_root) of a pattern's local shards; None for remote ones."""
    if is_remote(pattern):
        return None
    if os.path.isdir(pattern):
        split = benchmark_split(Path(pattern))
        return find_root(split if split is not None else Path(pattern))
    urls = expand(pattern)
    return find_root(Path(urls[0]).parent) if urls else None


def resolve(sources: list[ShardSource], need_sizes: bool) -> list[Shard]:
    shards: list[Shard] = []
    for index, source in enumerate(sources):
        if source.weight <= 0:
            raise UserError(f"shard pattern {source.pattern}: weight must be positive, got {source.weight}")
        urls = expand(source.pattern)
        if not urls:
            raise UserError(f"shard pattern {source.pattern} matches no files; check the path or brace range")
        missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"shard {missing[0]}{more} from pattern {source.pattern} does not exist")
        explicit = _load_sizes(source.sizes) if source.sizes else None
        for url in urls:
            size = _size(url, explicit)
            if size is None and need_sizes:
                raise UserError(
                    f"shard {url} has no known sample count; epoch mode needs one: pass a sizes.json "
                    "for remote shards, or use mode=resampled"
                )
            shards.append(Shard(url, size, index))
    return shards


def _size(url: str, explicit: dict | None) -> int | None:
    name = url.rsplit("/", 1)[-1]
    if explicit is not None and name in explicit:
        return int(explicit[name])
    if is_remote(url):
        return None
    path = Path(url)
    sizes = _sizes_file(str(path.parent / SIZES))
    if name in sizes:
        return int(sizes[name])
    stats = img2dataset_stats(path)
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    return _count_samples(url)


@cache
def _sizes_file(path: str) -> dict:
    return _load_sizes(path) if os.path.isfile(path) else {}


def _load_sizes(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"sizes file {path} is unreadable ({e})") from None


_count_samples = cache(count_samples)  # a pattern resolved twice (a loader, then evaluation) scans once
