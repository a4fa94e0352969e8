"""A dataset folder as `prepare` writes it:

    NAME/train/NAME-000000.tar ... + sizes.json     NAME/val/...      (the splits)
    NAME/stats.json  NAME/failures.jsonl  NAME/dataset.json           (beside the splits)

img2dataset's flat folder (00000.tar + 00000_stats.json, no splits) reads as one split, "all".
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "val")
SIZES = "sizes.json"  # shard file name -> samples (open_clip's convention), in each split folder
STATS = "stats.json"  # counts by outcome, reasons, time, settings
FAILURES = "failures.jsonl"  # one line per input that did not make it: source, reason
DATASET = "dataset.json"  # what was run, with what settings, which shards (and the class names)
ROOT_FILES = (STATS, FAILURES, DATASET)
ANONYMOUS_SPLIT = "all"


def shard_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def img2dataset_stats(shard: Path) -> Path:
    """img2dataset's per-shard counts file: 00000.tar -> 00000_stats.json."""
    return shard.with_name(f"{shard.stem}_stats.json")


def split_name(shard: Path) -> str:
    """A prepare split folder carries sizes.json; anything else is one anonymous split."""
    return shard.parent.name if (shard.parent / SIZES).is_file() else ANONYMOUS_SPLIT


def split_shards(folder: Path) -> dict[str, list[Path]]:
    """{split: its shards, sorted} of a dataset folder (split sub-folders), a split folder itself
    or a flat folder of tars."""
    splits = {d.name: sorted(d.glob("*.tar")) for d in sorted(folder.iterdir()) if d.is_dir()}
    splits = {k: v for k, v in splits.items() if v}
    for shard in sorted(folder.glob("*.tar")):
        splits.setdefault(split_name(shard), []).append(shard)
    return splits


def find_root(folder: Path) -> Path | None:
    """The dataset folder (the one holding stats.json / failures.jsonl / dataset.json) of shards in
    `folder`: the folder itself (flat) or its parent (a split folder); None when neither is one."""
    for d in (folder, folder.parent):
        if any((d / n).is_file() for n in ROOT_FILES):
            return d
    return None
