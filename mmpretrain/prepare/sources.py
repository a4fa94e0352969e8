"""Sources: every supported input kind becomes one ordered stream of `Input`s.

Order is fixed (sorted folder walks, manifest row order, tar member order) because the position
of an input in the stream is its sample key, and byte-identical shards depend on it.

Manifests, tar shards and text files may be fsspec URLs (s3://bucket/list.parquet): they are
streamed through `storage`, and a manifest's relative image paths are then keys beside it. Folder
sources are local (or mounted) folders.

A folder source reads only what lies inside it: a file that is a link resolving outside the folder
(`ln -s /etc/passwd c.txt`) becomes an `outside_source` failure, unless `--follow-symlinks` says
otherwise; links to directories are not walked unless it does either. A `.tar` source's members
are size-checked from their headers before they are read (`too_large`, `--max-bytes`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.prepare.labels import LabelMap, column_names, has_names
from mmpretrain.shards.format import (
    CAPTION_EXT,
    IMAGE_EXTS,
    LABEL_EXT,
    image_ext,
    member_bytes,
    sample_metadata,
)
from mmpretrain.shards.reader import ShardError, iter_tar_samples, too_large
from mmpretrain.shards.resolve import expand
from mmpretrain.shards.resolve import missing as missing_shards

# Image files a source folder may hold (Pillow reads them all; `prepare` re-encodes them). Not the
# image members of a shard: those are shards.format.IMAGE_EXTS.
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
KINDS = ("folder", "classes", "csv", "tsv", "jsonl", "parquet", "wds", "text")
MANIFESTS = ("csv", "tsv", "jsonl", "parquet")  # the kinds read by iter_manifest
IMAGE_COLUMNS = ("image", "url", "path", "filepath", "file", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass
class Input:
    """One would-be sample. Only cheap facts are gathered here; bytes are read by the workers."""

    source: str  # path, URL or shard#key: what failures.jsonl names
    image: str | None = None  # local path, http(s) URL or storage URL (s3://...)
    data: bytes | None = None  # image bytes already in hand (tar sources, after download)
    caption: str | bytes | None = None
    caption_path: str | None = None
    label: int | None = None
    label_path: str | None = None
    meta_path: str | None = None
    extra: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None  # a failure known before any work (reason, detail)
    index: int = -1  # position in the whole stream, set by the pipeline

    @property
    def is_url(self) -> bool:
        return self.image is not None and self.image.startswith(("http://", "https://"))


@dataclass(frozen=True)
class ColumnOptions:
    image: str | None = None
    caption: str | None = None
    label: str | None = None
    caption_template: str = "a photo of a {}."
    classnames: tuple[str, ...] = ()  # --classnames FILE's names, label 0 first; () = none given


@dataclass(frozen=True)
class ReadOptions:
    """How sources are read: what `prepare` may open and how much of it it holds at once."""

    follow_symlinks: bool = False
    """Follow links in folder sources that lead outside the source root (else `outside_source`)."""
    max_member_bytes: int = 20_000_000
    """Largest tar member a `.tar` source may hand over (`too_large` above it); `--max-bytes`."""


def detect_kind(source: str, text_only: bool = False) -> str:
    if text_only:
        return "text"
    if any(c in source for c in "{*?[") or source.endswith(".tar"):
        return "wds"
    if not storage.is_local(source):
        return _remote_kind(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"source {source} does not exist; check the path")
    if path.is_file():
        kind = MANIFEST_KINDS.get(path.suffix.lower())
        if kind is None:
            raise UserError(
                f"cannot tell what kind of source {source} is from its extension; pass --format "
                f"({'|'.join(KINDS)})"
            )
        return kind
    with os.scandir(path) as it:  # the entry types come with the listing: no stat per file
        entries = sorted((e.name, e.is_dir()) for e in it)
    top = [name for name, _ in entries]
    if (
        any(name.endswith(".tar") for name in top)
        or not any(_is_image(n) for n in top)
        and any(name.endswith(".tar") for name in _walk_names(path, limit=1000))
    ):
        return "wds"
    subdirs = [name for name, is_dir in entries if is_dir]
    if subdirs and not any(_is_image(n) for n in top):
        names = list(_walk_names(path / subdirs[0], limit=1000))
        if any(_is_image(n) for n in names) and not any(n.endswith(".txt") for n in names):
            return "classes"
    return "folder"


def _remote_kind(source: str) -> str:
    """A URL source: a manifest by its extension, or a prefix of tar shards."""
    kind = MANIFEST_KINDS.get(posixpath.splitext(source)[1].lower())
    if kind is not None:
        if not storage.isfile(source):
            raise UserError(f"source {source} does not exist; check the URL")
        return kind
    if storage.isdir(source):
        return "wds"
    raise UserError(f"source {source} does not exist, or is not a manifest ({', '.join(MANIFEST_KINDS)}) "
                    "or a prefix of .tar shards; check the URL or pass --format")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_FILE_SUFFIXES)


def _walk_names(root: Path, limit: int) -> Iterator[str]:
    count = 0
    for _, _, files in os.walk(root):
        for name in files:
            yield name
            count += 1
            if count >= limit:
                return


def class_names(root: str) -> list[str]:
    """Class folders of an ImageNet-style tree, sorted: the label is the position in this list."""
    path = Path(root)
    return sorted(n for n in os.listdir(path) if (path / n).is_dir())


def iter_inputs(source: str, kind: str, columns: ColumnOptions, classes: list[str],
                read: ReadOptions = ReadOptions(), labels: LabelMap = LabelMap()) -> Iterator[Input]:
    if kind == "folder":
        return iter_folder(Path(source), read)
    if kind == "classes":
        return iter_class_folders(Path(source), classes, columns.caption_template, read)
    if kind in MANIFESTS:
        return iter_manifest(source, kind, columns, labels)
    if kind == "wds":
        return iter_tars(source, read)
    raise UserError(f"source {source}: kind '{kind}' is not an image-text source; use --text-only for text")


def iter_folder(root: Path, read: ReadOptions = ReadOptions()) -> Iterator[Input]:
    """img2dataset's "files" layout: IMAGE + same-stem .txt caption (+ optional .json, .cls)."""
    inside = None if read.follow_symlinks else os.path.realpath(root)
    for dirpath, filenames in _walk(root, read.follow_symlinks):
        linked = _linked_folder(inside, dirpath)
        by_stem: dict[str, dict[str, str]] = {}
        for name in filenames:
            stem, ext = os.path.splitext(name)
            by_stem.setdefault(stem, {})[ext.lower()] = os.path.join(dirpath, name)
        for stem in sorted(by_stem):
            files = by_stem[stem]
            images = [files[e] for e in sorted(files) if e in IMAGE_FILE_SUFFIXES]
            for image in images:
                inp = Input(
                    source=image,
                    image=image,
                    caption_path=files.get(".txt"),
                    meta_path=files.get(".json"),
                    label_path=files.get(".cls"),
                )
                paths = (image, inp.caption_path, inp.meta_path, inp.label_path)
                inp.error = _outside_source(inside, linked, *(p for p in paths if p is not None))
                yield inp
            if not images and ".txt" in files:
                yield Input(
                    source=files[".txt"], error=("missing_image", "a caption file with no image beside it")
                )


def iter_class_folders(root: Path, classes: list[str], template: str,
                       read: ReadOptions = ReadOptions()) -> Iterator[Input]:
    """ImageNet layout: ROOT/CLASS/**/IMAGE; caption from a template over the class name."""
    inside = None if read.follow_symlinks else os.path.realpath(root)
    for name in class_names(str(root)):
        label = classes.index(name)
        caption = template.format(name.replace("_", " "))
        for dirpath, filenames in _walk(root / name, read.follow_symlinks):
            linked = _linked_folder(inside, dirpath)  # a class folder may itself be a link
            for fname in filenames:
                if _is_image(fname):
                    path = os.path.join(dirpath, fname)
                    yield Input(source=path, image=path, caption=caption, label=label, extra={"class": name},
                                error=_outside_source(inside, linked, path))


def _walk(root: Path, follow: bool) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) of a tree, folders in sorted order. Links to folders are walked
    only when `follow`, and then each real folder once: a link to an ancestor would loop forever."""
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow):
        dirnames.sort()
        if follow:
            kept = []
            for name in dirnames:
                real = os.path.realpath(os.path.join(dirpath, name))
                if real not in seen:
                    seen.add(real)
                    kept.append(name)
            dirnames[:] = kept
        yield dirpath, sorted(filenames)


def _linked_folder(root: str | None, folder: str) -> bool:
    """Whether a folder being walked lies outside `root` (a real path; None: links are followed)
    through a link: the top of a walk is entered even when it is a link (a class folder)."""
    return root is not None and not _within(os.path.realpath(folder), root)


def _outside_source(root: str | None, linked: bool, *paths: str) -> tuple[str, str] | None:
    """The `outside_source` failure of the first path that resolves outside `root` (a real path;
    None: links are followed). Only links and files in a `linked` folder need the realpath: the
    walk enters no other linked folder."""
    if root is None:
        return None
    for path in paths:
        if linked or os.path.islink(path):
            target = os.path.realpath(path)
            if not _within(target, root):
                return ("outside_source", f"{path} resolves to {target} through a link, outside the source "
                                          f"folder {root}; pass --follow-symlinks to read it")
    return None


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def iter_manifest(source: str, kind: str, columns: ColumnOptions, labels: LabelMap = LabelMap()) -> Iterator[Input]:
    path = _shown(source)
    rows, names = _manifest_rows(source, kind)
    image_col = _pick_column(path, names, columns.image, IMAGE_COLUMNS, "--image-column")
    caption_col = _pick_column(path, names, columns.caption, CAPTION_COLUMNS, "--caption-column")
    label_col = _label_column(path, names, columns)
    base = storage.parent(path)
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}"
        if isinstance(row, tuple):  # an unreadable row: (reason, detail)
            yield Input(source=where, error=row)
            continue
        yield _row_input(row, where, base, image_col, caption_col, label_col, labels)


def _shown(source: str) -> str:
    """How a manifest is named in failures and errors: a local path normalised, a URL as given."""
    return source if storage.is_url(source) else str(Path(source))


def _label_column(path: str, names: list[str], columns: ColumnOptions) -> str | None:
    if columns.label and columns.label not in names:
        raise UserError(f"manifest {path} has no column '{columns.label}' (--label-column); columns: {names}")
    return columns.label or ("label" if "label" in names else None)


def manifest_label_names(path: str, kind: str, columns: ColumnOptions) -> list[str] | None:
    """The class names of a manifest's label column: its sorted names (labels.column_names) or, with
    --classnames, that file's names as soon as one name is seen; None when it holds integers only or
    there is no label column. One pass over that column only (parquet reads just it, numeric ones
    not at all)."""
    values = _label_values(path, kind, columns)
    if values is None:
        return None
    if columns.classnames:
        return list(columns.classnames) if has_names(values) else None
    return column_names(values, f"label column '{columns.label or 'label'}' of manifest {_shown(path)}")


def _label_values(path: str, kind: str, columns: ColumnOptions) -> Iterator | None:
    """The label column's cells in row order; None when there is none or it can hold no names."""
    if kind != "parquet":
        rows, names = _manifest_rows(path, kind)
        column = _label_column(_shown(path), names, columns)
        return None if column is None else (r.get(column) for r in rows if isinstance(r, dict))
    import pyarrow as pa

    pf = _parquet_file(path)
    column = _label_column(_shown(path), list(pf.schema_arrow.names), columns)
    if column is None:
        return None
    kind_of = pf.schema_arrow.field(column).type
    if pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of) or pa.types.is_boolean(kind_of):
        return None  # a numeric column holds no names: no pass over it
    return (v for batch in pf.iter_batches(batch_size=65536, columns=[column]) for v in batch.column(0).to_pylist())


def _row_input(
    row: dict, where: str, base: str, image_col: str, caption_col: str, label_col: str | None,
    labels: LabelMap = LabelMap(),
) -> Input:
    value = row.get(image_col)
    extra = {k: _json_safe(v) for k, v in row.items() if k not in (image_col, caption_col, label_col)}
    if value is None or str(value).strip() == "":
        return Input(source=where, error=("missing_image", f"row has no value in column '{image_col}'"))
    image = str(value).strip()
    if not storage.is_url(image) and not os.path.isabs(image):
        image = storage.join(base, image)  # beside the manifest: a local path, or a key under its URL
    caption = row.get(caption_col)
    caption = (
        None if caption is None or (isinstance(caption, float) and math.isnan(caption)) else str(caption)
    )
    inp = Input(source=image, image=image, caption=caption, extra=extra)
    if label_col is not None:
        inp.label, error = labels.label(row.get(label_col), where)
        inp.error = inp.error or error
    return inp


def _open_text(source: str, newline: str | None = None, errors: str = "strict") -> io.TextIOBase:
    """A manifest as text: a local file, or a URL streamed through storage."""
    if storage.is_url(source):
        return io.TextIOWrapper(storage.open_read(source), encoding="utf-8-sig", newline=newline, errors=errors)
    return open(source, newline=newline, encoding="utf-8-sig", errors=errors)  # noqa: SIM115 - the caller closes it


def _manifest_rows(path: str, kind: str) -> tuple[Iterator, list[str]]:
    if kind in ("csv", "tsv"):
        fh = _open_text(path, newline="")
        reader = csv.DictReader(fh, delimiter="," if kind == "csv" else "\t")
        names = list(reader.fieldnames or [])

        def rows():
            with fh:
                yield from reader

        return rows(), names
    if kind == "jsonl":
        return _jsonl_rows(path)
    pf = _parquet_file(path)

    def parquet_rows():
        for batch in pf.iter_batches(batch_size=4096):
            yield from batch.to_pylist()

    return parquet_rows(), list(pf.schema_arrow.names)


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    handle = storage.open_read(path) if storage.is_url(path) else path
    try:
        return pq.ParquetFile(handle)
    except Exception as e:
        raise UserError(f"manifest {_shown(path)} is not a readable parquet file ({e})") from None


def _jsonl_rows(path: str) -> tuple[Iterator, list[str]]:
    names: list[str] = []
    with _open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    names = list(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    pass
                break

    def rows():
        with _open_text(path, errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield ("invalid_row", f"not valid JSON: {e}")
                    continue
                yield row if isinstance(row, dict) else ("invalid_row", "a JSON value that is not an object")

    return rows(), names


def _pick_column(path: str, names: list[str], wanted: str | None, candidates: tuple, flag: str) -> str:
    if wanted:
        if wanted not in names:
            raise UserError(f"manifest {path} has no column '{wanted}' ({flag}); columns: {names}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise UserError(
        f"manifest {path} has none of the columns {list(candidates)}; name yours with {flag} (columns: {names})"
    )


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def expand_tar_paths(source: str) -> list[str]:
    """Brace patterns, globs, a directory (every .tar below it, sorted) or one tar."""
    paths = expand(source, recursive=True)
    missing = missing_shards(paths)  # one listing per folder, also on object storage
    if not paths or missing:
        raise UserError(
            f"shard source {source} matches no tar file{': ' + missing[0] if missing else ''}; check the pattern"
        )
    return paths


def iter_tars(source: str, read: ReadOptions = ReadOptions()) -> Iterator[Input]:
    """Samples of existing WebDataset shards (ours, img2dataset's), to re-size or re-shard. A sample
    with a member over read.max_member_bytes is a `too_large` failure, a broken shard one
    `corrupt_shard` failure after its readable samples; both leave the other shards going."""
    paths = expand_tar_paths(source)
    for path in paths:
        try:
            for sample in iter_tar_samples(path, max_member_bytes=read.max_member_bytes):
                if (why := too_large(sample)) is not None:
                    yield Input(source=f"{path}#{sample['__key__']}", error=("too_large", f"{why} (--max-bytes)"))
                    continue
                yield _tar_input(path, sample["__key__"], member_bytes(sample))
        except ShardError as e:
            yield Input(source=path, error=("corrupt_shard", str(e)))


def _tar_input(path: str, key: str, parts: dict[str, bytes]) -> Input:
    where = f"{path}#{key}"
    extra = {k: v for k, v in sample_metadata(parts).items() if k not in _RECOMPUTED}
    source = extra.pop("url", None) or extra.pop("source", None) or where
    image = image_ext(parts)
    if image is None:
        return Input(source=where, error=("missing_image", f"sample has no image member ({'/'.join(IMAGE_EXTS)})"))
    inp = Input(source=str(source), data=parts[image], caption=parts.get(CAPTION_EXT), extra=extra)
    if LABEL_EXT in parts:
        try:
            inp.label = int(parts[LABEL_EXT].decode().strip())
        except (ValueError, UnicodeDecodeError):
            inp.error = ("invalid_label", f"{where}: .cls is not an integer")
    return inp


# Fields that a re-shard recomputes rather than copies from the old sample's .json.
_RECOMPUTED = {
    "key",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "status",
    "error_message",
    "label",
}
