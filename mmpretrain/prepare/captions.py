"""Caption and document text: decode, repair, normalise, split."""

from __future__ import annotations

import re

from mmpretrain.errors import SampleError
from mmpretrain.textrepair import repair

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def decode_text(raw: bytes) -> str:
    """UTF-8 (a leading BOM is dropped); anything else is a recorded failure, not a guess."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SampleError("caption_not_utf8", f"byte {e.start}: {e.reason}") from None


def clean_text(text: str) -> str:
    """Repair mojibake and HTML entities (ftfy, as open_clip's tokenizer does) and collapse all
    white space, newlines included, to single spaces."""
    return " ".join(repair(text).split())


def clean_caption(text: str | bytes | None) -> str:
    if text is None:
        raise SampleError("missing_caption", "no caption for this image")
    caption = clean_text(decode_text(text) if isinstance(text, bytes) else str(text))
    if not caption:
        raise SampleError("empty_caption", "caption is empty after normalising white space")
    return caption


def split_document(text: str, max_chars: int) -> list[str]:
    """Pack whole sentences greedily into chunks of at most `max_chars`; a sentence longer than
    that is cut at word boundaries, a word longer than that at `max_chars`."""
    return _pack((piece for sentence in _SENTENCE_END.split(text) for piece in _cut(sentence, max_chars)), max_chars)


def _cut(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    parts = (word[i : i + max_chars] for word in sentence.split(" ") for i in range(0, max(len(word), 1), max_chars))
    return _pack(parts, max_chars)


def _pack(pieces, max_chars: int) -> list[str]:
    """Join pieces with single spaces into as few chunks of at most `max_chars` as greedy allows."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks
