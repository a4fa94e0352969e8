"""A dataset folder as `prepare` writes it:

    NAME/train/NAME-000000.tar ... + sizes.json     NAME/val/...      (the splits)
    NAME/stats.json  NAME/failures.jsonl  NAME/dataset.json           (beside the splits)

img2dataset's flat folder (00000.tar + 00000_stats.json, no splits) reads as one split, "all".
CLIP_benchmark's webdataset sets (`clip_benchmark_export_wds`) are read too:

    DIR/test/nshards.txt  DIR/test/0.tar 1.tar ...                    (a split: n shards, numbered)
    DIR/classnames.txt  DIR/zeroshot_classification_templates.txt  DIR/dataset_type.txt

Folders are local paths or object prefixes (s3://bucket/NAME, any fsspec URL), read through storage.
"""

from __future__ import annotations

from pathlib import Path

from mmpretrain import storage
from mmpretrain.errors import UserError

SPLITS = ("train", "val")
SIZES = "sizes.json"  # shard file name -> samples (open_clip's convention), in each split folder
STATS = "stats.json"  # counts by outcome, reasons, time, settings
FAILURES = "failures.jsonl"  # one line per input that did not make it: source, reason
DATASET = "dataset.json"  # what was run, with what settings, which shards (and the class names)
ANONYMOUS_SPLIT = "all"
NSHARDS = "nshards.txt"  # CLIP_benchmark: the split's shard count; shards are 0.tar .. {n-1}.tar
BENCHMARK_SPLIT = "test"  # the split CLIP_benchmark evaluates by default
BENCHMARK_CLASSNAMES = "classnames.txt"  # one class name per line, label 0 first
BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"  # one template per line, with {c}
BENCHMARK_FILES = (BENCHMARK_CLASSNAMES, BENCHMARK_TEMPLATES, "dataset_type.txt")
ROOT_FILES = (STATS, FAILURES, DATASET, *BENCHMARK_FILES)


def shard_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def img2dataset_stats(shard: str | Path) -> str:
    """img2dataset's per-shard counts file: 00000.tar -> 00000_stats.json."""
    stem = storage.name(shard).rsplit(".", 1)[0]
    return storage.join(storage.parent(shard), f"{stem}_stats.json")


def split_of(folder: str | Path) -> str:
    """A prepare split folder carries sizes.json; anything else is one anonymous split."""
    return storage.name(folder) if storage.isfile(storage.join(folder, SIZES)) else ANONYMOUS_SPLIT


def split_name(shard: str | Path) -> str:
    """The split of a shard: that of its folder (split_of)."""
    return split_of(storage.parent(shard))


def tars(folder: str | Path) -> list[str]:
    """The .tar files directly in a folder (a local path or an object prefix), sorted."""
    return [storage.join(folder, n) for n in storage.listdir(folder) if n.endswith(".tar")]


def split_shards(folder: str | Path) -> dict[str, list[str]]:
    """{split: its shards, sorted} of a dataset folder (split sub-folders), a split folder itself
    or a flat folder of tars; local or remote (s3://bucket/NAME)."""
    names = storage.listdir(folder)
    splits = {n: found for n in names if not n.endswith(".tar") and (found := tars(storage.join(folder, n)))}
    if own := [storage.join(folder, n) for n in names if n.endswith(".tar")]:
        splits.setdefault(split_of(folder), []).extend(own)
    return splits


def find_root(folder: str | Path) -> str | None:
    """The dataset folder (the one holding stats.json / failures.jsonl / dataset.json) of shards in
    `folder`: the folder itself (flat) or its parent (a split folder); None when neither is one.
    One listing per folder, so that an object prefix costs one request, not one per name."""
    above = storage.parent(folder) or "."
    if storage.is_url(folder) and not storage.is_url(above):  # s3://bucket has nothing above it
        above = ""
    for d in dict.fromkeys(filter(None, (str(folder), above))):
        present = set(storage.listdir(d))
        if any(storage.isfile(storage.join(d, n)) for n in ROOT_FILES if n in present):
            return d
    return None


def benchmark_split(folder: str | Path) -> str | None:
    """The CLIP_benchmark split folder a path names: the folder itself when it holds nshards.txt,
    else its `test` split; None when it is not a CLIP_benchmark folder."""
    for d in (str(folder), storage.join(folder, BENCHMARK_SPLIT)):
        if storage.isfile(storage.join(d, NSHARDS)):
            return d
    return None


def benchmark_shards(split: str | Path) -> list[str]:
    """0.tar .. {n-1}.tar of a CLIP_benchmark split folder, n from its nshards.txt."""
    path = storage.join(split, NSHARDS)
    text = storage.read_bytes(path).decode("utf-8", errors="replace").strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{path} holds {text[:40]!r}; CLIP_benchmark's nshards.txt must hold the number of "
                        "shards (0.tar .. N-1.tar), a positive integer")
    return [storage.join(split, f"{i}.tar") for i in range(int(text))]


def read_lines(path: str | Path, what: str) -> list[str]:
    """The stripped lines of a UTF-8 text file the user names (a local path or a URL); one-line errors."""
    try:
        data = storage.read_bytes(path) if not storage.is_local(path) else Path(storage.local_path(path)).read_bytes()
        text = data.decode("utf-8")
    except (FileNotFoundError, storage.Missing):
        raise UserError(f"{what} file {path} not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {e.start}); "
                             f"save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{what} file {path} cannot be read: {e.strerror}") from None
    return [line.strip() for line in text.splitlines()]


def read_classnames(path: str | Path) -> list[str]:
    """A class-name file (ours, CLIP_benchmark's classnames.txt, prepare --classnames): one name per
    line in label order (line 1 = label 0); trailing blank lines ignored."""
    lines = read_lines(path, "class-name")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"class-name file {path} is empty; write one class name per line, label 0 first")
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, 1):
        if not name:
            raise UserError(f"class-name file {path}: line {number} is blank; labels are line numbers, "
                                 f"so every line up to the last must name a class")
        if name in seen:
            raise UserError(f"class-name file {path}: {name!r} on line {number} repeats line "
                                 f"{seen[name]}; class names must be unique")
        seen[name] = number
    return lines
