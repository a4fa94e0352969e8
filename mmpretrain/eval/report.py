"""The evaluation report PNG: captions with their top-k retrieved images, per-class accuracy bars.

Drawn with Pillow only. The file is written under a temporary name and renamed, so a crash or
Ctrl-C never leaves a half-written report at the requested path.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from mmpretrain.eval.retrieval import (
    EvalInputError,
    check_embeddings,
    check_indices,
    positive_ranks,
    top_k,
)
from mmpretrain.storage import atomic_writer

THUMB = 128  # px, square cell of a retrieved image
PAD = 16
CAPTION_W = 300  # px, the caption column left of the thumbnails
LINE_H = 16
BAR_W = 360  # px, a 100% accuracy bar
BAR_H = 16
NAME_W = 200  # px, class-name column left of the bars
MAX_BARS = 40  # more classes: the 20 worst and 20 best, so the picture stays readable
_GAP = ("...", None)  # the row between the worst and the best classes
CORRECT = (22, 150, 60)
WRONG = (200, 200, 200)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
MISSED = (190, 40, 40)


@dataclass
class RetrievalExample:
    """One text -> image query for the report."""

    caption: str
    images: list[Image.Image]  # retrieved images, best first
    correct: list[bool]  # per retrieved image: is it the caption's own image
    scores: list[float] | None = None  # per retrieved image
    positive_rank: int | None = None  # rank of the caption's image, shown when it is not retrieved


def retrieval_examples(text_emb: Tensor, image_emb: Tensor, text_to_image, captions: Sequence[str],
                       load_image: Callable[[int], Image.Image], queries: Sequence[int], *,
                       k: int = 5) -> list[RetrievalExample]:
    """Report rows for the caption indices `queries`: their top-k images (same tie rule as the metrics).

    `load_image(i)` returns image i (numbered as in text_to_image); only the retrieved ones are loaded.
    """
    image_emb, text_emb = check_embeddings("report", "image_emb", image_emb, "text_emb", text_emb)
    t2i = check_indices("report", "text_to_image", text_to_image, len(text_emb), "text_emb", len(image_emb),
                        "images")
    if len(captions) != len(text_emb):
        raise EvalInputError(f"report: {len(captions)} captions for {len(text_emb)} text embeddings")
    rows = check_indices("report", "queries", list(queries), len(queries), "queries", len(text_emb),
                         "captions")
    query_emb = text_emb[rows]  # (Q, d)
    best = top_k(query_emb, image_emb, k)  # (Q, k)
    ranks = positive_ranks(query_emb, image_emb, torch.arange(len(rows)), t2i[rows])  # (Q,)
    scores = (query_emb[:, None, :] * image_emb[best]).sum(-1)  # (Q, k), for display only
    examples = []
    for q, row in enumerate(rows.tolist()):
        picked = best[q].tolist()
        examples.append(RetrievalExample(
            caption=captions[row],
            images=[load_image(i) for i in picked],
            correct=[i == t2i[row].item() for i in picked],
            scores=scores[q].tolist(),
            positive_rank=int(ranks[q]),
        ))
    return examples


def render_report(path: str | Path, *, retrieval_examples: Sequence[RetrievalExample] = (),
                  class_accuracy: Mapping[str, float | None] | None = None,
                  title: str = "mmpretrain evaluation", summary: Mapping[str, float] | None = None) -> Path:
    """Write the report PNG at `path` (atomically) and return it.

    `retrieval_examples` become one row each; `class_accuracy` (class name -> recall in [0, 1], None for
    a class without samples) becomes horizontal bars; `summary` is one line of headline numbers.
    """
    if not retrieval_examples and not class_accuracy:
        raise EvalInputError("report: nothing to draw; give retrieval examples or per-class accuracy")
    font, bold = _font(13), _font(16)
    sections = []
    if retrieval_examples:
        sections.append(_retrieval_section(retrieval_examples, font, bold))
    if class_accuracy:
        sections.append(_class_section(class_accuracy, font, bold))
    sections.insert(0, _header(title, summary, max(s.width for s in sections), bold, font))
    sheet = Image.new("RGB", (max(s.width for s in sections), sum(s.height for s in sections)), "white")
    y = 0
    for section in sections:
        sheet.paste(section, (0, y))
        y += section.height
    return _save_atomic(sheet, Path(path))


# -- sections --------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """`text` cut with "..." so that it is at most `width` px wide in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _header(title: str, summary: Mapping[str, float] | None, width: int, bold, font) -> Image.Image:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (summary or {}).items()]
    chars = max(20, int((width - 2 * PAD) / (font.getlength("abcdefghijklmnopqrstuvwxyz_=0.123") / 33)))
    lines = textwrap.wrap("   ".join(parts), chars) if parts else []
    width = max(width, int(bold.getlength(title)) + 2 * PAD)
    image = Image.new("RGB", (width, PAD + 24 + LINE_H * len(lines) + PAD // 2), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill=INK, font=bold)
    for i, line in enumerate(lines):
        draw.text((PAD, PAD + 24 + i * LINE_H), line, fill=MUTED, font=font)
    return image


def _retrieval_section(examples: Sequence[RetrievalExample], font, bold) -> Image.Image:
    k = max(len(e.images) for e in examples)
    row_h = THUMB + 2 * LINE_H + PAD
    width = PAD + CAPTION_W + k * (THUMB + PAD)
    image = Image.new("RGB", (width, 28 + len(examples) * row_h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, 4), f"Text -> image: top {k} per caption (green outline: the caption's own image)",
              fill=INK, font=bold)
    for r, example in enumerate(examples):
        _draw_example(image, draw, example, (PAD, 28 + r * row_h), font)
    return image


def _draw_example(image: Image.Image, draw: ImageDraw.ImageDraw, example: RetrievalExample,
                  origin: tuple[int, int], font) -> None:
    x0, y0 = origin
    chars = max(10, int((CAPTION_W - PAD) / (font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))
    lines = textwrap.wrap(" ".join(example.caption.split()), chars, max_lines=THUMB // LINE_H - 1,
                          placeholder=" ...")
    for i, line in enumerate(lines):
        draw.text((x0, y0 + i * LINE_H), line, fill=INK, font=font)
    if example.positive_rank is not None and not any(example.correct):
        draw.text((x0, y0 + THUMB - LINE_H), f"own image at rank {example.positive_rank}", fill=MISSED,
                  font=font)
    for j, (thumb, correct) in enumerate(zip(example.images, example.correct)):
        x = x0 + CAPTION_W + j * (THUMB + PAD)
        image.paste(_thumb(thumb), (x, y0))
        width = 5 if correct else 1
        draw.rectangle((x - width, y0 - width, x + THUMB + width - 1, y0 + THUMB + width - 1),
                       outline=CORRECT if correct else WRONG, width=width)
        label = f"#{j + 1}" + (f"  {example.scores[j]:.3f}" if example.scores else "")
        draw.text((x, y0 + THUMB + 6), label, fill=CORRECT if correct else MUTED, font=font)


def _thumb(picture: Image.Image) -> Image.Image:
    cell = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
    fitted = ImageOps.contain(picture.convert("RGB"), (THUMB, THUMB))
    cell.paste(fitted, ((THUMB - fitted.width) // 2, (THUMB - fitted.height) // 2))
    return cell


def _bars_to_show(class_accuracy: Mapping[str, float | None]) -> tuple[list[tuple[str, float | None]], str]:
    """All bars in the given order, or for many classes the worst and best half of MAX_BARS (None = a gap)."""
    items = list(class_accuracy.items())
    if len(items) <= MAX_BARS:
        return items, "Per-class accuracy (top-1 recall)"
    scored = sorted(((n, a) for n, a in items if a is not None), key=lambda item: item[1])
    half = MAX_BARS // 2
    heading = f"Per-class accuracy (top-1 recall): the {half} worst and {half} best of {len(items)} classes"
    if len(scored) < len(items):
        heading += f", {len(items) - len(scored)} without samples not shown"
    return scored[:half] + [_GAP] + scored[-half:], heading


def _class_section(class_accuracy: Mapping[str, float | None], font, bold) -> Image.Image:
    items, heading = _bars_to_show(class_accuracy)
    row_h = BAR_H + 6
    width = max(PAD + NAME_W + BAR_W + 70, int(bold.getlength(heading)) + 2 * PAD)
    image = Image.new("RGB", (width, 28 + len(items) * row_h + PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, 4), heading, fill=INK, font=bold)
    for i, item in enumerate(items):
        (name, accuracy), y, x = item, 28 + i * row_h, PAD + NAME_W
        draw.text((PAD, y + 1), _fit(name, font, NAME_W - 8), fill=INK, font=font)
        if item is _GAP:
            continue
        draw.rectangle((x, y, x + BAR_W, y + BAR_H), fill=(238, 238, 238))
        if accuracy is None:
            draw.text((x + 4, y + 1), "no samples", fill=MUTED, font=font)
            continue
        draw.rectangle((x, y, x + round(BAR_W * accuracy), y + BAR_H), fill=(70, 120, 200))
        draw.text((x + BAR_W + 6, y + 1), f"{accuracy:.1%}", fill=INK, font=font)
    return image


def _save_atomic(sheet: Image.Image, path: Path) -> Path:
    with atomic_writer(path) as fh:
        sheet.save(fh, format="PNG")
    return path
