"""Masked-LM corruption (BERT 80/10/10 over tokens, whole words or SpanBERT spans) and AR targets.

Every random draw comes from the caller's `torch.Generator`, and each call draws the same number of
values whatever the text, so a (seed, step, rank, worker)-seeded generator replays a run exactly.

Every row that has at least one maskable token gets at least one selected position: a short caption
could otherwise draw none (0.85**8 = 27% of 8-token captions under "token"), leaving that row with no
MLM target. For "token"/"whole_word" this adds one unit to such rows, so the realised rate on very
short texts sits slightly above `probability`; "span" gets it from its budget of at least one token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmpretrain.config import MaskingConfig
from mmpretrain.data.records import IGNORE_INDEX
from mmpretrain.data.text.tokenizer import TokenBatch, Tokenizer


def maskable(batch: TokenBatch, tokenizer: Tokenizer) -> Tensor:
    """(B, L) bool: real, non-special tokens (never sot/eot/sep/mask, never padding)."""
    return batch.attention_mask & ~tokenizer.is_special[batch.ids]


def span_length_probs(span_p: float, max_span: int) -> Tensor:
    """P(length = k words), k = 1..max_span: geometric(span_p) renormalised on 1..max_span."""
    k = torch.arange(1, max_span + 1, dtype=torch.float64)
    probs = span_p * (1.0 - span_p) ** (k - 1)
    return probs / probs.sum()


def mask_tokens(batch: TokenBatch, tokenizer: Tokenizer, cfg: MaskingConfig,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Returns (input_ids, labels): labels = original id at selected positions, -100 elsewhere."""
    unit = select_units(batch, tokenizer, cfg, generator)
    return _corrupt(batch.ids, unit, tokenizer, cfg, generator)


def select_units(batch: TokenBatch, tokenizer: Tokenizer, cfg: MaskingConfig,
                 generator: torch.Generator) -> Tensor:
    """(B, L) long: the unit (token position, word index or span index) each selected token belongs
    to, -1 where not selected. The 80/10/10 choice is made once per unit."""
    eligible = maskable(batch, tokenizer)  # (B, L)
    if cfg.strategy == "token":
        return _select_tokens(eligible, cfg.probability, generator)
    if cfg.strategy == "whole_word":
        return _select_words(eligible, batch.word_start, cfg.probability, generator)
    return _select_spans(eligible, batch.word_start, cfg, generator)


def ar_targets(batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) for next-token prediction: labels[:, i] = ids[:, i + 1] for i < length - 1."""
    ids = batch.ids
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    positions = torch.arange(ids.shape[1])[None, :]  # (1, L)
    labels[positions >= (batch.lengths - 1)[:, None]] = IGNORE_INDEX  # last real token and padding
    return ids.clone(), labels


# ------------------------------------------------------------------ selection: (B, L) unit ids, -1 = not selected
def _select_tokens(eligible: Tensor, p: float, generator: torch.Generator) -> Tensor:
    selected = eligible & (torch.rand(eligible.shape, generator=generator) < p)  # (B, L)
    position = torch.arange(eligible.shape[1]).expand_as(eligible)
    fallback = _random_position(eligible, generator)  # (B,)
    selected |= _rows_needing_one(selected, eligible)[:, None] & (position == fallback[:, None])
    return torch.where(selected, position, -1)


def _select_words(eligible: Tensor, word_start: Tensor, p: float, generator: torch.Generator) -> Tensor:
    # Word k of a row covers the tokens whose running count of word starts is k + 1. Every maskable
    # token belongs to a word: the first one follows a special token, so it starts a word.
    word_id = (torch.cumsum(word_start.long(), dim=1) - 1).clamp(min=0)  # (B, L)
    chosen = torch.rand(eligible.shape, generator=generator) < p  # (B, L) indexed by word id
    fallback_word = word_id.gather(1, _random_position(word_start & eligible, generator)[:, None])  # (B, 1)
    selected = eligible & chosen.gather(1, word_id)
    selected |= _rows_needing_one(selected, eligible)[:, None] & eligible & (word_id == fallback_word)
    return torch.where(selected, word_id, -1)


def _select_spans(eligible: Tensor, word_start: Tensor, cfg: MaskingConfig, generator: torch.Generator) -> Tensor:
    """SpanBERT: spans of whole words at random word starts until round(p * maskable) tokens are taken.

    The last span stops as soon as the budget is met (as in SpanBERT's code) but always finishes the
    word it is in, so a row overshoots its budget by less than one word and never cuts a word.
    """
    B, L = eligible.shape
    n_elig = eligible.sum(1)  # (B,)
    budgets = torch.where(n_elig > 0, torch.floor(cfg.probability * n_elig + 0.5).long().clamp(min=1), 0)
    # Each span takes >= 1 new token, so a row needs at most `budget` <= L draws; drawing L per row
    # whatever the data keeps the generator's stream independent of the text.
    cdf = torch.cumsum(span_length_probs(cfg.span_p, cfg.max_span), 0)
    lengths = torch.searchsorted(cdf, torch.rand((B, L), generator=generator, dtype=torch.float64)) + 1
    anchors = torch.rand((B, L), generator=generator, dtype=torch.float64)  # (B, L) in [0, 1)
    most = int(budgets.max()) if B else 0
    lengths = lengths.clamp(max=cfg.max_span)[:, :most].tolist()  # (B, most) span lengths in words
    anchors = anchors[:, :most].tolist()
    # The first maskable token of a row starts word 0, so maskable tokens carry word ids 0 .. W-1.
    word_id = (torch.cumsum(word_start.long(), dim=1) - 1).clamp(min=0)  # (B, L)
    pieces = torch.zeros_like(word_id).scatter_add_(1, word_id, eligible.long())  # (B, L) tokens per word
    n_words = word_start.sum(1)  # (B,)
    pieces_rows = pieces.tolist()
    budgets = budgets.tolist()
    flat: list[int] = []  # span index of word w of row r, rows concatenated
    for row, n in enumerate(n_words.tolist()):
        if n:
            flat += _spans_for_row(pieces_rows[row][:n], budgets[row], lengths[row], anchors[row])
    span_of_word = torch.full((B, L), -1, dtype=torch.long)
    span_of_word[torch.arange(L)[None, :] < n_words[:, None]] = torch.from_numpy(np.array(flat, dtype=np.int64))  # row-major
    return torch.where(eligible, span_of_word.gather(1, word_id), -1)  # (B, L)


def _spans_for_row(pieces: list[int], budget: int, lengths: list[int], anchors: list[float]) -> list[int]:
    """Span index of each word (-1 = unmasked) for one row; pure Python, rows are <= 77 tokens."""
    n_words = len(pieces)
    span_of_word = [-1] * n_words
    free = list(range(n_words))
    taken = 0
    span = 0
    while taken < budget:
        start = free[int(anchors[span] * len(free))]
        for w in range(start, min(start + lengths[span], n_words)):
            if span_of_word[w] >= 0:  # already masked by an earlier span: counts toward the length
                continue
            span_of_word[w] = span
            free.remove(w)
            taken += pieces[w]
            if taken >= budget:
                break
        span += 1
    return span_of_word


def _random_position(candidates: Tensor, generator: torch.Generator) -> Tensor:
    """(B,) a uniformly random True position per row (0 for rows without one)."""
    scores = torch.rand(candidates.shape, generator=generator)
    return torch.where(candidates, scores, -1.0).argmax(dim=1)


def _rows_needing_one(selected: Tensor, eligible: Tensor) -> Tensor:
    return eligible.any(dim=1) & ~selected.any(dim=1)  # (B,)


# ------------------------------------------------------------------ 80/10/10, decided once per unit
def _corrupt(ids: Tensor, unit: Tensor, tokenizer: Tokenizer, cfg: MaskingConfig,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    selected = unit >= 0  # (B, L)
    decision = torch.rand(ids.shape, generator=generator).gather(1, unit.clamp(min=0))  # (B, L), per unit
    random_ids = torch.randint(0, tokenizer.num_ordinary, ids.shape, generator=generator)
    to_mask = selected & (decision < cfg.mask_fraction)
    to_random = selected & ~to_mask & (decision < cfg.mask_fraction + cfg.random_fraction)
    input_ids = torch.where(to_mask, tokenizer.mask_id, ids)
    input_ids = torch.where(to_random, random_ids, input_ids)
    labels = torch.where(selected, ids, IGNORE_INDEX)
    return input_ids, labels
