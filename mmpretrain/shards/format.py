"""What a sample is: the members a tar holds per sample, the rules that name
them, and how the members are read. Everything that opens a sample's members uses these.

A sample as the reader hands it out: {"__key__", "__url__", "__index__", ext: bytes, ...}.
"""

from __future__ import annotations

import hashlib
import json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in the order a reader picks one when a sample has two
CAPTION_EXT = "txt"  # UTF-8 caption (the whole document in text-only shards)
METADATA_EXT = "json"
LABEL_EXT = "cls"  # an integer label


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member; webdataset's base_plus_ext: the key is the path up to the
    first dot of the basename. None for names without one (a member no sample owns)."""
    base = name.rpartition("/")[2]
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return name[: len(name) - len(base)] + stem, ext.lower()


def sample_key(index: int) -> str:
    """The key `prepare` gives the sample at `index` of its input stream: digits only, no dots."""
    return f"{index:09d}"


def member_bytes(sample: dict) -> dict[str, bytes]:
    """A reader sample's member bytes by extension, without its __key__/__url__/__index__."""
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def image_ext(sample: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


def caption_problem(raw: bytes | None) -> str | None:
    """Why a caption member is unusable (a reason counted in `skipped`), or None."""
    if raw is None:
        return "missing_caption"
    try:
        return None if raw.decode("utf-8").strip() else "empty_caption"
    except UnicodeDecodeError:
        return "caption_not_utf8"


def sample_label(sample: dict) -> int:
    """The `.cls` label; -1 when absent or not an integer."""
    try:
        return int(sample[LABEL_EXT].decode().strip()) if LABEL_EXT in sample else -1
    except (ValueError, UnicodeDecodeError):
        return -1


def sample_metadata(sample: dict) -> dict:
    """The sample's `.json` as a dict ({} when absent or unreadable: metadata is optional)."""
    try:
        meta = json.loads(sample[METADATA_EXT]) if METADATA_EXT in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def all_captions(meta: dict, caption: str) -> list[str]:
    """Every caption of the image, for retrieval evaluation: the `.json`'s "captions" list when it
    holds strings (COCO/Flickr style sets), else each non-blank line of the `.txt` caption.

    Lines are split as CLIP_benchmark splits them (`str.splitlines`): its webdataset retrieval sets
    keep an image's captions as the lines of one `.txt`. Training reads the whole `.txt` as one
    caption; `prepare` never writes a newline into one (white space is collapsed)."""
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    return lines or [caption]


def image_hash(sample: dict, ext: str, meta: dict) -> str:
    """The sha256 that `prepare` recorded, else the hash of the image bytes (same definition)."""
    digest = meta.get("sha256")
    return digest if isinstance(digest, str) else hashlib.sha256(sample[ext]).hexdigest()
