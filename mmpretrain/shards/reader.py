"""Reading WebDataset tars sample by sample, shared by `prepare` (re-sharding) and the loaders.

A sample is the run of consecutive members with the same key (webdataset's grouping). Samples
before `start` are skipped from their headers alone: their bytes are never handed out, and for
local files never even read (tarfile seeks over them) — this is what makes resume cheap.
"""

from __future__ import annotations

import importlib
import tarfile
from collections.abc import Iterator

from mmpretrain.shards.resolve import is_remote, sample_key


class ShardError(Exception):
    """A shard that cannot be read; the message names it."""


def iter_tar_samples(url: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Yield {"__key__", "__url__", "__index__", ext: bytes, ...} for samples start <= i < stop."""
    index, key, sample = -1, None, None
    try:
        with _open(url) as tar:
            for info in tar:
                this = sample_key(info.name) if info.isfile() else None
                if this is None:
                    continue
                if this != key:
                    if sample is not None:
                        yield sample
                    index, key, sample = index + 1, this, None
                    if stop is not None and index >= stop:
                        return
                    if index >= start:
                        sample = {"__key__": this, "__url__": url, "__index__": index}
                if sample is not None:
                    ext = info.name.rsplit("/", 1)[-1].split(".", 1)[1].lower()
                    sample[ext] = tar.extractfile(info).read()
            if sample is not None:
                yield sample
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {url} is unreadable after sample {max(index, 0)}: {e}") from None


def _open(url: str) -> tarfile.TarFile:
    if is_remote(url):
        # webdataset's gopen handles pipe:, http(s), and the cloud schemes users already configure.
        gopen = importlib.import_module("webdataset.gopen").gopen
        return tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
    return tarfile.open(url, mode="r:*")
