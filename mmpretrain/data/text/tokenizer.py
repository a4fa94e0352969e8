"""CLIP BPE tokenizer with `<mask>` and `<sep>`, returning padded tensors plus the lengths that define them.

Wraps open_clip's `SimpleTokenizer` (same vocabulary, cleaning and truncation, so a plain caption
gets exactly the ids `open_clip.tokenize` gives). Two rules the rest of the code relies on:

* Padding is id 0, which is also the real token "!" (e.g. `!"$` encodes to ids 0, 1, 259), so
  padding is never detected by `id == 0`; `lengths` is the truth and `attention_mask` derives from it.
* The CLIP text embedding pools at `eot_index` (= lengths - 1), never at `ids.argmax(-1)`: once
  `<mask>` (49408) or `<sep>` (49409) appear, the largest id is no longer the end of text.
"""

from __future__ import annotations

import html
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import ftfy
import numpy as np
import torch
from torch import Tensor

from mmpretrain.textrepair import NEEDS_FTFY

DEFAULT_CONTEXT_LENGTH = 77
SPECIAL_TOKENS = ("<mask>", "<sep>")


@lru_cache(maxsize=1)
def open_clip_tokenizer_module() -> ModuleType:
    """open_clip's own `tokenizer.py`, without running `open_clip/__init__.py`.

    That __init__ imports torchvision and timm: 20+ s on our 2-core machine (measured), paid by every
    dataloader worker and CLI call, while tokenizer.py is self-contained (ftfy, regex, numpy, torch).
    If open_clip is already imported we use its module; otherwise we load the same file directly.
    """
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    package = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (pip install open_clip_torch)")
    path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("mmpretrain._open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class TokenBatch:
    """Padded token ids; all other fields are views of what `lengths` says about them."""

    ids: Tensor  # (B, L) long, [sot] tokens [eot] then 0-padding
    lengths: Tensor  # (B,) long, real tokens including sot/eot
    eot_index: Tensor  # (B,) long, lengths - 1: where the CLIP text embedding is pooled
    word_start: Tensor  # (B, L) bool, first BPE piece of each word (specials, padding: False)
    segment_ids: Tensor | None = None  # (B, L) long for pairs: 0 = sot A sep, 1 = B eot, 0 = padding

    @property
    def attention_mask(self) -> Tensor:
        """(B, L) bool, True at real tokens (position < length)."""
        positions = torch.arange(self.ids.shape[1])
        return positions[None, :] < self.lengths[:, None]


class Tokenizer:
    """open_clip's CLIP BPE plus `<mask>`/`<sep>`; vocab_size 49410 is the text embedding's size."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 5:
            raise ValueError(f"context_length must be >= 5 (sot, sep, eot and a token per segment), got {context_length}")
        oc = open_clip_tokenizer_module()
        self._bpe = oc.SimpleTokenizer(additional_special_tokens=list(SPECIAL_TOKENS), context_length=context_length)
        enc = self._bpe.encoder
        self.sot_id: int = enc["<start_of_text>"]
        self.eot_id: int = enc["<end_of_text>"]
        self.mask_id: int = enc["<mask>"]
        self.sep_id: int = enc["<sep>"]
        self.pad_id: int = 0
        self.vocab_size: int = len(enc)
        # open_clip 3.3 appends the extra specials after sot/eot; the model's embedding rows depend on it.
        assert (self.sot_id, self.eot_id, self.mask_id, self.sep_id, self.vocab_size) == (
            49406, 49407, 49408, 49409, 49410), "open_clip changed its special-token ids"
        self.context_length = context_length
        self.special_ids = frozenset((self.sot_id, self.eot_id, self.mask_id, self.sep_id))
        self.num_ordinary = self.sot_id  # ids 0 .. 49405 are ordinary BPE tokens
        strings = [self._bpe.decoder[i] for i in range(self.vocab_size)]
        self.word_end = torch.tensor([s.endswith("</w>") for s in strings])  # (V,) bool
        self.is_special = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,) bool
        self.is_special[sorted(self.special_ids)] = True
        self._piece_cache: dict[str, list[int]] = {}

    def __reduce__(self):
        # Rebuilt from its argument in the receiving process (dataloader workers under spawn): the
        # wrapped SimpleTokenizer's class lives in a module loaded by path, which pickle cannot name.
        return (type(self), (self.context_length,))

    # ---------------------------------------------------------------- text -> BPE ids (no specials)
    def _clean(self, text: str) -> str:
        """open_clip's 'lower' cleaning (ftfy, html unescape twice, whitespace, lower case)."""
        if NEEDS_FTFY.search(text):  # else html/ftfy change nothing (tested)
            text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return " ".join(text.split()).lower()

    def bpe_ids(self, text: str) -> list[int]:
        """BPE ids of one text without sot/eot, identical to `SimpleTokenizer.encode`."""
        out: list[int] = []
        cache = self._piece_cache
        for piece in self._bpe.pat.findall(self._clean(text)):
            ids = cache.get(piece)
            if ids is None:
                bpe = self._bpe
                unicode_piece = "".join(bpe.byte_encoder[b] for b in piece.encode("utf-8"))
                ids = cache[piece] = [bpe.encoder[t] for t in bpe.bpe(unicode_piece).split(" ")]
            out.extend(ids)
        return out

    # ---------------------------------------------------------------- batches
    def encode(self, texts: list[str]) -> TokenBatch:
        """`[sot] + bpe[:L-2] + [eot]` then 0-padding, as open_clip truncates."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        keep = self.context_length - 2
        rows = [[self.sot_id, *self.bpe_ids(t)[:keep], self.eot_id] for t in texts]
        return self._pack(rows)

    def encode_pair(self, first: list[str], second: list[str]) -> TokenBatch:
        """`[sot] A [sep] B [eot]`; the longer side is cut first (BERT's truncate_seq_pair)."""
        if len(first) != len(second):
            raise ValueError(f"encode_pair needs as many first as second texts ({len(first)} != {len(second)})")
        budget = self.context_length - 3
        rows, n_first = [], []
        for a_text, b_text in zip(first, second):
            a, b = self.bpe_ids(a_text), self.bpe_ids(b_text)
            la, lb = truncate_pair(len(a), len(b), budget)
            rows.append([self.sot_id, *a[:la], self.sep_id, *b[:lb], self.eot_id])
            n_first.append(la + 2)  # sot + A + sep
        batch = self._pack(rows)
        positions = torch.arange(self.context_length)[None, :]  # (1, L)
        second_part = (positions >= torch.tensor(n_first)[:, None]) & batch.attention_mask
        batch.segment_ids = second_part.long()  # (B, L)
        return batch

    def _pack(self, rows: list[list[int]]) -> TokenBatch:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
        ids = np.zeros((len(rows), self.context_length), dtype=np.int64)
        # Scatter the ragged rows in one shot: column = position within its row.
        row_of = np.repeat(np.arange(len(rows)), lengths)
        col_of = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids[row_of, col_of] = flat
        ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
        return TokenBatch(ids=ids_t, lengths=lengths_t, eot_index=lengths_t - 1,
                          word_start=self.word_starts(ids_t, lengths_t))

    def word_starts(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) bool: an ordinary real token whose previous token ends a word or is a special."""
        real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, L)
        ordinary = real & ~self.is_special[ids]
        prev_closes = self.word_end[ids[:, :-1]] | self.is_special[ids[:, :-1]]  # (B, L-1)
        start = torch.zeros_like(ordinary)
        start[:, 1:] = ordinary[:, 1:] & prev_closes
        return start

    def decode(self, ids_row: Tensor | list[int], length: int | None = None) -> str:
        """Text of one row: stops at `length` (or the first eot); specials are written out, sot dropped."""
        ids = ids_row.tolist() if isinstance(ids_row, Tensor) else list(ids_row)
        if length is not None:
            ids = ids[:length]
        elif self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id) + 1]
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or i in self.special_ids:
                if run:
                    parts.append(self._bpe.decode(run))
                    run = []
                if i is not None and i not in (self.sot_id, self.eot_id):
                    parts.append(self._bpe.decoder[i] + " ")
            else:
                run.append(i)
        return "".join(parts).strip()


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept by BERT's truncate_seq_pair: pop from the longer side (B on ties) until it fits."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if 2 * short <= budget:  # the shorter side survives whole
        return (short, budget - short) if len_a <= len_b else (budget - short, short)
    # Both reach budget/2; B is popped first on ties, so A keeps the odd token.
    return (budget + 1) // 2, budget // 2
