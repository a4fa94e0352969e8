"""Text-only sources for the text branch: plain-text files and JSONL text fields, one `Input` per
chunk of at most `max_chars` characters (long documents are split at sentence boundaries)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmpretrain import storage
from mmpretrain.errors import SampleError, UserError
from mmpretrain.prepare.captions import clean_text, decode_text, split_document
from mmpretrain.prepare.sources import Input

TEXT_EXTS = (".txt", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class TextOptions:
    unit: str = "line"  # "line": one document per line; "paragraph": blank-line separated
    field: str = "text"  # JSONL field holding the document
    max_chars: int = 2000


def text_files(source: str) -> list[str]:
    """The text files of a source: itself, or every .txt/.jsonl/.ndjson below it, sorted. Local
    paths or storage URLs (s3://bucket/corpus/)."""
    if storage.is_url(source) and not storage.is_local(source):
        if storage.isfile(source):
            return [source]
        files = [f for f in storage.find(source) if _is_text(f)] if storage.isdir(source) else None
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"text source {source} does not exist; check the path")
        if path.is_file():
            return [str(path)]
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_text(p.name))
    if files is None:
        raise UserError(f"text source {source} does not exist; check the URL")
    if not files:
        raise UserError(f"text source {source} holds no {'/'.join(TEXT_EXTS)} files")
    return files


def _is_text(name: str) -> bool:
    return name.lower().endswith(TEXT_EXTS)


def iter_text_inputs(source: str, opts: TextOptions) -> Iterator[Input]:
    for path in text_files(source):
        documents = (
            _jsonl_documents(path, opts.field)
            if not path.lower().endswith(".txt")
            else _plain_documents(path, opts.unit)
        )
        for where, doc in documents:
            if isinstance(doc, SampleError):
                yield Input(source=where, error=(doc.reason, doc.detail))
                continue
            text = clean_text(doc)
            if not text:
                continue  # a blank document is a separator, not an input
            for chunk in split_document(text, opts.max_chars):
                yield Input(source=where, caption=chunk)


def _plain_documents(path: str, unit: str) -> Iterator[tuple[str, str | SampleError]]:
    """(where, text) per document; undecodable bytes become a failure for that document only."""
    with storage.open_read(path) as fh:
        if unit == "line":
            for number, raw in enumerate(fh, start=1):
                yield f"{path}:{number}", _decode(raw)
            return
        start, lines = 1, []
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                if not lines:
                    start = number
                lines.append(raw)
            elif lines:
                yield f"{path}:{start}", _decode(b"".join(lines))
                lines = []
        if lines:
            yield f"{path}:{start}", _decode(b"".join(lines))


def _decode(raw: bytes) -> str | SampleError:
    try:
        return decode_text(raw)
    except SampleError as e:
        return SampleError("text_not_utf8", e.detail)


def _jsonl_documents(path: str, field: str) -> Iterator[tuple[str, str | SampleError]]:
    with storage.open_read(path) as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            text = _decode(raw)
            if isinstance(text, SampleError):
                yield where, text
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield where, SampleError("invalid_row", f"not valid JSON: {e}")
                continue
            value = row.get(field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                yield where, SampleError("missing_text", f"no string field '{field}' (--text-field)")
                continue
            yield where, value

