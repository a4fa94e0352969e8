"""`mmpretrain inspect`: read WebDataset shards once, validate every sample, summarise them.

Accepts a `prepare` output directory (train/ val/ + sizes.json, stats.json, failures.jsonl), a flat
directory of tars (img2dataset output), a single tar, or a brace/glob pattern. Shards are read by
the one reader (shards.reader), so inspect sees the samples and defects training sees; only one
sample's members are held at a time.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import textwrap
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.shards.format import (
    CAPTION_EXT,
    IMAGE_EXTS,
    LABEL_EXT,
    caption_problem,
    image_ext,
    member_bytes,
)
from mmpretrain.shards.layout import (
    DATASET,
    FAILURES,
    SIZES,
    STATS,
    find_root,
    img2dataset_stats,
    split_of,
    split_shards,
)
from mmpretrain.shards.reader import ShardError, is_listable, iter_tar_samples
from mmpretrain.shards.resolve import expand, is_folder, missing

MAX_PROBLEMS = 50
# Contact sheet geometry, in pixels; tests compute the expected size from these.
THUMB, PAD, COLUMNS, CAPTION_LINES, LINE_HEIGHT = 160, 8, 8, 3, 14
CELL_W, CELL_H = THUMB + PAD, THUMB + CAPTION_LINES * LINE_HEIGHT + 2 * PAD
_CAPTION_PROBLEMS = {"missing_caption": "has no caption (.txt)", "empty_caption": "has an empty caption",
                     "caption_not_utf8": "has a caption that is not valid UTF-8"}


@dataclass
class SplitReport:
    shards: int = 0
    samples: int = 0
    per_shard: dict | None = None  # {"min", "mean", "max"} samples per shard


@dataclass
class InspectReport:
    target: str
    text_only: bool = False
    splits: dict[str, SplitReport] = field(default_factory=dict)
    image_width: dict | None = None  # {"min", "median", "max"}
    image_height: dict | None = None
    caption_chars: dict | None = None
    caption_words: dict | None = None
    labels: dict | None = None  # {"samples": with a .cls, "distinct": label values}
    failure_reasons: dict[str, int] = field(default_factory=dict)
    failures_from: str | None = None  # the file(s) the failures were read from
    sizes_agree: bool | None = None  # None when no sizes.json was found
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS
    problem_count: int = 0
    grid: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        kind = "text-only" if self.text_only else "image-text"
        kind = kind if any(s.samples for s in self.splits.values()) else "no samples"
        lines = [f"{self.target} ({kind})", f"{'split':<8}{'shards':>8}{'samples':>10}  per shard min/mean/max"]
        for name, s in self.splits.items():
            p = s.per_shard or {"min": 0, "mean": 0, "max": 0}
            lines.append(f"{name:<8}{s.shards:>8}{s.samples:>10}  {p['min']}/{p['mean']:.1f}/{p['max']}")
        for label, summ in [("image width", self.image_width), ("image height", self.image_height),
                            ("caption chars", self.caption_chars), ("caption words", self.caption_words)]:
            if summ:
                lines.append(f"{label:<14} min {summ['min']}  median {summ['median']}  max {summ['max']}")
        if self.labels:
            lines.append(f"labels: {self.labels['samples']} samples, {self.labels['distinct']} distinct")
        total = sum(self.failure_reasons.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.failure_reasons.items(), key=lambda kv: -kv[1]))
        source = f" [from {self.failures_from}]" if self.failures_from else ""
        lines.append(f"failures: {total}" + (f" ({reasons})" if reasons else "") + source)
        agree = {None: "absent", True: "agrees with the shards", False: "DISAGREES with the shards"}
        lines += [f"sizes.json: {agree[self.sizes_agree]}", f"problems: {self.problem_count}"]
        lines += [f"  {p}" for p in self.problems]
        if self.problem_count > len(self.problems):
            lines.append(f"  ... and {self.problem_count - len(self.problems)} more")
        return "\n".join(lines + ([f"grid: {self.grid}"] if self.grid else []))


def _summary(values) -> dict | None:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


def _resolve(target: str) -> tuple[dict[str, list[str]], str | None, bool, list[str]]:
    """Return ({split: shard paths or URLs}, dataset root or None, whether whole directories were
    listed, paths a brace pattern named that do not exist)."""
    if not is_listable(target):
        raise UserError(f"{target}: inspect reads local paths and storage URLs (s3://…), not pipe: or "
                        "http(s) URLs; download the shards or give their storage URL")
    if is_folder(target):
        splits = split_shards(target)
        if not splits:
            raise UserError(f"no .tar shards in {target} or its split folders; point inspect at the output "
                            "of `mmpretrain prepare` or a pattern like DIR/*.tar")
        return splits, find_root(target), True, []
    found = list(dict.fromkeys(p if storage.is_url(p) else os.path.normpath(p) for p in expand(target)))
    absent = set(missing(found))
    existing = [p for p in found if p not in absent]
    if not existing:
        raise UserError(f"no shards found at {target}; give a directory, a .tar file or a pattern "
                        "like shards/NAME/train/NAME-{000000..000009}.tar")
    splits: dict[str, list[str]] = {}
    split_of_folder = {folder: split_of(folder) for folder in dict.fromkeys(_folder(p) for p in existing)}
    for p in existing:
        splits.setdefault(split_of_folder[_folder(p)], []).append(p)
    return splits, find_root(_folder(existing[0])), False, [p for p in found if p in absent]


def _folder(path: str) -> str:
    return storage.parent(path) or "."


class _Scan:
    """Accumulates statistics and problems over all samples of all shards."""

    def __init__(self):
        self.widths, self.heights, self.chars, self.words = (array("l") for _ in range(4))
        self.labels: Counter = Counter()
        self.seen: dict[str, str] = {}
        self.no_image: list[tuple[str, str]] = []
        self.no_image_count = 0
        self.any_image = False
        self.problems: list[str] = []
        self.problem_count = 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def shard(self, path: str) -> int:
        n = 0
        try:
            for sample in iter_tar_samples(path):
                n += 1
                self.sample(path, sample["__key__"], member_bytes(sample))
        except ShardError as e:
            why = e.reason or "its end-of-archive block is missing: cut short"
            self.problem(f"{path}: unreadable tar after {e.samples} samples ({why}); re-create or delete this shard")
        return n

    def sample(self, path: str, key: str, members: dict[str, bytes]) -> None:
        if (other := self.seen.get(key)) is not None:
            where = "twice in this shard" if other == path else f"also in {other}"
            self.problem(f"{path}: sample {key} is a duplicate key, {where}")
        self.seen[key] = path
        image = image_ext(members)
        if image is None:
            self.no_image_count += 1
            if len(self.no_image) < MAX_PROBLEMS:
                self.no_image.append((path, key))
        else:
            self.any_image = True
            self._image(path, key, image, members[image])
        self._caption(path, key, members.get(CAPTION_EXT))
        if LABEL_EXT in members:
            self.labels[members[LABEL_EXT].strip()] += 1

    def _image(self, path: str, key: str, ext: str, data: bytes) -> None:
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only, no decode
                w, h = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            self.problem(f"{path}: sample {key} has an unreadable .{ext} image ({e})")
            return
        self.widths.append(w)
        self.heights.append(h)

    def _caption(self, path: str, key: str, data: bytes | None) -> None:
        if problem := caption_problem(data):
            return self.problem(f"{path}: sample {key} {_CAPTION_PROBLEMS[problem]}")
        text = data.decode("utf-8")
        self.chars.append(len(text.strip()))
        self.words.append(len(text.split()))


def _read_json(path: str, scan: _Scan) -> dict | None:
    try:
        return json.loads(storage.read_text(path)) if storage.isfile(path) else None
    except (OSError, ValueError) as e:
        scan.problem(f"{path}: not readable JSON ({e})")
    except UserError as e:  # remote: refused or gone between listing and reading
        scan.problem(str(e))


def _failure_reasons(root: str | None, shards: list[str], scan: _Scan) -> tuple[dict[str, int], str | None]:
    """(reasons -> count, where they were read): prepare's stats.json or failures.jsonl, else the
    `status_dict`s of img2dataset's per-shard NNNNN_stats.json files."""
    stats = _read_json(storage.join(root, STATS), scan) if root else None
    if isinstance(stats, dict) and isinstance(stats.get("reasons"), dict):
        return {str(k): int(v) for k, v in stats["reasons"].items()}, storage.join(root, STATS)
    reasons: Counter = Counter()
    path = storage.join(root, FAILURES) if root else None
    if path is not None and storage.isfile(path):
        for i, line in enumerate(storage.read_text(path).splitlines(), 1):
            try:
                reasons[str(json.loads(line).get("reason", "unknown"))] += 1
            except (ValueError, AttributeError):
                scan.problem(f"{path}: line {i} is not a JSON object")
        return dict(reasons), path
    stats_files = list(map(img2dataset_stats, shards))
    absent = set(missing(stats_files))  # one listing per remote folder
    found = [f for f in stats_files if f not in absent]
    for f in found:
        status = (_read_json(f, scan) or {}).get("status_dict")
        if isinstance(status, dict):  # {"success": n, "<error message>": m, ...}
            reasons.update({str(k): int(v) for k, v in status.items() if k != "success" and isinstance(v, int)})
    return dict(reasons), (f"{len(found)} img2dataset *_stats.json files" if found else None)


def _check_sizes(counts: dict[str, int], whole_dirs: bool, scan: _Scan) -> bool | None:
    agree = None
    for folder in dict.fromkeys(map(_folder, counts)):
        sizes = _read_json(storage.join(folder, SIZES), scan)
        if not isinstance(sizes, dict):
            continue
        agree = True if agree is None else agree
        listed = {n for n in sizes if whole_dirs or storage.join(folder, n) in counts}
        for name in sorted(listed | {storage.name(p) for p in counts if _folder(p) == folder}):
            actual = counts.get(storage.join(folder, name))
            if actual is None or sizes.get(name) != actual:
                agree = False
                said = "is not listed" if name not in sizes else f"lists {sizes[name]} samples"
                has = "no such shard exists" if actual is None else f"the shard has {actual}"
                scan.problem(f"{storage.join(folder, SIZES)}: {name} {said}, {has}; re-run prepare or fix sizes.json")
    return agree


def grid_size(n: int) -> tuple[int, int]:
    """Pixel (width, height) of a contact sheet of n samples."""
    cols = min(COLUMNS, n)
    return PAD + cols * CELL_W, PAD + math.ceil(n / cols) * CELL_H


def _font():
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _pick(counts: dict[str, int], n: int) -> dict[str, set[int]]:
    """n sample positions spread evenly over all samples in shard order: {shard: {index in shard}}."""
    total = sum(counts.values())
    k = min(n, total)
    wanted, picked, start = [i * total // k for i in range(k)], {}, 0
    for path, count in counts.items():
        if chosen := {i - start for i in wanted if start <= i < start + count}:
            picked[path] = chosen
        start += count
    return picked


def _thumbs(picked: dict[str, set[int]]) -> list[tuple[Image.Image, str]]:
    out = []
    for path, indices in picked.items():
        try:
            for sample in iter_tar_samples(path, min(indices), max(indices) + 1):
                image = image_ext(sample)
                if sample["__index__"] in indices and image is not None:
                    caption = sample.get(CAPTION_EXT, b"").decode("utf-8", "replace")
                    out.append((_thumb(sample[image]), caption))
        except ShardError:
            continue  # already reported by the scan
    return out


def _thumb(data: bytes) -> Image.Image:
    cell = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced scale
            im = ImageOps.contain(im.convert("RGB"), (THUMB, THUMB))
            cell.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    except (OSError, ValueError, Image.DecompressionBombError):
        pass  # a grey cell; the scan names the bad image
    return cell


def _write_grid(items: list[tuple[Image.Image, str]], out: Path) -> None:
    sheet = Image.new("RGB", grid_size(len(items)), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    chars = max(4, int(THUMB / (font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))
    cols = min(COLUMNS, len(items))
    for i, (thumb, caption) in enumerate(items):
        x, y = PAD + (i % cols) * CELL_W, PAD + (i // cols) * CELL_H
        sheet.paste(thumb, (x, y))
        lines = textwrap.wrap(" ".join(caption.split()), chars, max_lines=CAPTION_LINES, placeholder=" …")
        for j, line in enumerate(lines):
            draw.text((x, y + THUMB + 4 + j * LINE_HEIGHT), line, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)


def inspect_shards(target: str, grid: Path | None = None, grid_samples: int = 32) -> InspectReport:
    """Read every shard under `target`, validate each sample and summarise; optionally draw a grid."""
    splits, root, whole, missing = _resolve(target)
    scan, counts, report = _Scan(), {}, InspectReport(target=target)
    for path in missing:
        scan.problem(f"{path}: named by the pattern but does not exist")
    for name, shards in splits.items():
        counts.update((p, scan.shard(p)) for p in shards)
        sizes = [counts[p] for p in shards]
        report.splits[name] = SplitReport(len(shards), sum(sizes), {
            "min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)})
    meta = _read_json(storage.join(root, DATASET), scan) if root else None
    report.text_only = (isinstance(meta, dict) and meta.get("kind") == "text") or not scan.any_image
    if not report.text_only:
        for path, key in scan.no_image:
            scan.problem(f"{path}: sample {key} has no image (.{'/.'.join(IMAGE_EXTS)})")
        scan.problem_count += scan.no_image_count - len(scan.no_image)
    report.image_width, report.image_height = _summary(scan.widths), _summary(scan.heights)
    report.caption_chars, report.caption_words = _summary(scan.chars), _summary(scan.words)
    if scan.labels:
        report.labels = {"samples": sum(scan.labels.values()), "distinct": len(scan.labels)}
    report.failure_reasons, report.failures_from = _failure_reasons(root, list(counts), scan)
    report.sizes_agree = _check_sizes(counts, whole, scan)
    if grid is not None:
        if report.text_only:
            raise UserError(f"{target} holds text-only shards; --grid needs images, drop it")
        items = _thumbs(_pick(counts, max(1, grid_samples)))
        if not items:
            raise UserError(f"{target}: no readable samples to draw; --grid needs at least one image")
        _write_grid(items, Path(grid))
        report.grid = str(grid)
    report.problems, report.problem_count = scan.problems, scan.problem_count
    return report
