"""Shard patterns to a checked list of shards with sample counts: the one place that expands a
pattern (directories, globs, brace ranges; local paths and storage URLs alike).

A pattern is a local path, a storage URL (s3://bucket/NAME/train, gs://…, file://…: listed and read
through `storage`), or a URL only a reader can open (`pipe:` commands, http(s): brace ranges only).
Counts come from `sizes.json` beside the shards (open_clip's convention, written by `prepare`),
from img2dataset's `NNNNN_stats.json`, or, for local tars with neither, from the reader's scan of
the tar headers (no member data is read). A remote shard with neither has no known count (a scan
would download it): epoch mode, where exact per-process counts depend on them, then needs a
sizes.json given explicitly.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from braceexpand import braceexpand

from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.shards.layout import (
    SIZES,
    benchmark_shards,
    benchmark_split,
    find_root,
    img2dataset_stats,
    tars,
)
from mmpretrain.shards.reader import count_samples, is_listable, is_remote

_GLOB = "*?["


@dataclass(frozen=True)
class ShardSource:
    """One pattern of shards and its sampling weight (its share of samples in resampled mode)."""

    pattern: str
    weight: float = 1.0
    sizes: str | None = None  # a sizes.json for shards without one beside them (pipe:, http)


@dataclass(frozen=True)
class Shard:
    url: str
    size: int | None  # samples; None for remote shards without sizes
    source: int  # index into the list of ShardSources


def is_folder(pattern: str) -> bool:
    """A folder (or object prefix) rather than a file, a glob or a brace range."""
    if not storage.is_url(pattern):
        return os.path.isdir(pattern)
    plain = not any(c in pattern for c in _GLOB + "{") and not pattern.endswith(".tar")
    return plain and is_listable(pattern) and storage.isdir(pattern)


def expand(pattern: str, recursive: bool = False) -> list[str]:
    """Brace notation, globs and folders (every .tar in it, or below it, sorted; a CLIP_benchmark
    folder: the shards its nshards.txt names, unless `recursive`), for local paths and storage URLs
    alike; pipe: and http(s) URLs: brace notation only."""
    if not is_listable(pattern):
        return list(braceexpand(pattern))
    if is_folder(pattern):
        split = None if recursive else benchmark_split(pattern)
        if split is not None:
            return benchmark_shards(split)
        if storage.is_url(pattern):
            return storage.glob(storage.join(pattern, "**", "*.tar")) if recursive else tars(pattern)
        return sorted(str(p) for p in (Path(pattern).rglob if recursive else Path(pattern).glob)("*.tar"))
    urls: list[str] = []
    for part in braceexpand(pattern):
        if not any(c in part for c in _GLOB):
            urls.append(part)
        else:
            urls += storage.glob(part) if storage.is_url(part) else sorted(glob.glob(part))
    return urls


def dataset_root(pattern: str) -> str | None:
    """The dataset folder (layout.find_root) of a pattern's shards, local or remote; None for
    pipe: and http(s) ones, and for shards outside a dataset folder."""
    if not is_listable(pattern):
        return None
    if is_folder(pattern):
        split = benchmark_split(pattern)
        return find_root(split if split is not None else pattern)
    urls = expand(pattern)
    return find_root(storage.parent(urls[0]) or ".") if urls else None


class _Listings:
    """The names in each remote folder, listed once: one request per folder, not one per shard."""

    def __init__(self):
        self.names: dict[str, set[str]] = {}

    def has(self, url: str) -> bool:
        if not storage.is_url(url):
            return os.path.isfile(url)
        folder = storage.parent(url)
        if folder not in self.names:
            self.names[folder] = set(storage.listdir(folder))
        return storage.name(url) in self.names[folder]


def missing(urls: list[str], listings: _Listings | None = None) -> list[str]:
    """The shards of `urls` that do not exist (pipe: and http(s) URLs are not checked)."""
    listings = listings or _Listings()
    return [url for url in urls if is_listable(url) and not listings.has(url)]


def resolve(sources: list[ShardSource], need_sizes: bool) -> list[Shard]:
    shards: list[Shard] = []
    listings = _Listings()
    for index, source in enumerate(sources):
        if source.weight <= 0:
            raise UserError(f"shard pattern {source.pattern}: weight must be positive, got {source.weight}")
        urls = expand(source.pattern)
        if not urls:
            raise UserError(f"shard pattern {source.pattern} matches no files; check the path or brace range")
        if absent := missing(urls, listings):
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise UserError(f"shard {absent[0]}{more} from pattern {source.pattern} does not exist")
        explicit = _load_sizes(source.sizes) if source.sizes else None
        for url in urls:
            size = _size(url, explicit, listings)
            if size is None and need_sizes:
                raise UserError(
                    f"shard {url} has no known sample count (no {SIZES} beside it); the global sample order "
                    "needs one: pass a sizes.json for remote shards"
                )
            shards.append(Shard(url, size, index))
    return shards


def _size(url: str, explicit: dict | None, listings: _Listings) -> int | None:
    name = storage.name(url) if is_listable(url) else url.rsplit("/", 1)[-1]
    if explicit is not None and name in explicit:
        return int(explicit[name])
    if not is_listable(url):
        return None
    beside = storage.join(storage.parent(url) or ".", SIZES)
    sizes = _sizes_file(beside) if listings.has(beside) else {}
    if name in sizes:
        return int(sizes[name])
    stats = img2dataset_stats(url)
    if listings.has(stats):
        return int(json.loads(storage.read_text(stats))["successes"])
    return None if is_remote(url) else _count_samples(url)


@cache
def _sizes_file(path: str) -> dict:
    return _load_sizes(path) if storage.isfile(path) else {}


def _load_sizes(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path))
    except storage.Missing:
        raise UserError(f"sizes file {path} does not exist; check the path") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sizes file {path} is unreadable ({e})") from None


_count_samples = cache(count_samples)  # a pattern resolved twice (a loader, then evaluation) scans once
