"""The batches the online stage hands to the model: typed records, not string-keyed dicts.

The loaders build them in their workers; the trainer and the evaluator move them with `.to(device)`.
Tensors have the shapes in the comments; the non-tensor fields (keys, captions, sources) stay on the
CPU. `pin_memory()` is what torch's DataLoader calls on an object that has it (pin_memory=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of a position that is not predicted (torch's cross_entropy default)


class _Record:
    """`.to(device)` and `.pin_memory()` for a dataclass whose fields are tensors, records or plain data."""

    def to(self, device: torch.device | str, non_blocking: bool = False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn):
        changes: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, _Record):
                changes[f.name] = value._map(fn)
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass
class SentencePairs(_Record):
    """Two segments per row for next-sentence / sentence-order prediction."""

    input_ids: Tensor  # (B, L)
    segment_ids: Tensor  # (B, L) 0 = first segment, 1 = second
    attention_mask: Tensor  # (B, L) bool, real tokens
    eot_index: Tensor  # (B,) where the pair's state is pooled
    labels: Tensor  # (B,) 1 = true order / continuation


@dataclass
class TextBatch(_Record):
    """The text branch's inputs and targets for B texts (from text shards, or from the captions)."""

    mlm_input_ids: Tensor  # (B, L) with <mask> / random / kept tokens at the selected positions
    mlm_labels: Tensor  # (B, L) original ids at selected positions, IGNORE_INDEX elsewhere
    ar_input_ids: Tensor  # (B, L)
    ar_labels: Tensor  # (B, L) the next token, IGNORE_INDEX past the end
    attention_mask: Tensor  # (B, L) bool, real tokens
    eot_index: Tensor  # (B,)
    lengths: Tensor  # (B,) tokens per text, <start> and <end> included
    pairs: SentencePairs | None = None
    texts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.mlm_input_ids.shape[0]


@dataclass
class ImageTextBatch(_Record):
    """B image–caption samples, and the text-branch batch made from the captions when asked."""

    images: Tensor  # (B, 3, H, W) transformed
    tokens: Tensor  # (B, L) caption ids
    eot_index: Tensor  # (B,) end-of-text position: the CLIP embedding is pooled there
    lengths: Tensor  # (B,)
    labels: Tensor  # (B,) long, -1 = the sample has no KEY.cls
    keys: list[str] = field(default_factory=list)
    image_hashes: list[str] = field(default_factory=list)  # sha256 of the image bytes
    captions: list[str] = field(default_factory=list)
    all_captions: list[list[str]] = field(default_factory=list)  # every caption of the image
    sources: list[tuple[str, int]] = field(default_factory=list)  # (shard url, index in the shard)
    text: TextBatch | None = None

    def __len__(self) -> int:
        return self.images.shape[0]
