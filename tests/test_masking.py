"""MLM masking statistics (rates, 80/10/10, words, SpanBERT spans) and AR targets, on fixed seeds."""

import random

import pytest
import torch

from mmpretrain.data.text.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    ar_targets,
    mask_tokens,
    maskable,
    select_units,
)
from mmpretrain.data.text.tokenizer import TokenBatch, Tokenizer

# Mix of one-piece words and words BPE splits into several pieces (aard|var|k, inde|scri|bab|ly, ...).
WORDS = ("a photo of the dog cat sitting on red blue green car street people near beach sunset with "
         "aardvark zebrafish indescribably mmpretrain embryos photograph unbelievable , .").split()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _captions(n: int, seed: int, lo: int = 15, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def batch(tok):
    return tok.encode(_captions(300, seed=1) + ["", "a", " ".join(["word"] * 120)])  # ~9k maskable tokens


def _word_ids(batch: TokenBatch) -> torch.Tensor:
    return torch.cumsum(batch.word_start.long(), 1) - 1


def _check_common(batch, tok, input_ids, labels):
    eligible = maskable(batch, tok)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()  # specials and padding never selected ...
    assert torch.equal(input_ids[~selected], batch.ids[~selected])  # ... nor anything unselected changed
    assert torch.equal(labels[selected], batch.ids[selected])
    assert input_ids[selected & (input_ids != tok.mask_id)].max() < tok.sot_id  # random ids are ordinary
    has_any = eligible.any(1)
    assert selected[has_any].any(1).all()  # >= 1 target per row that has a maskable token
    assert not selected[~has_any].any()
    return eligible, selected


def _check_80_10_10(batch, tok, input_ids, selected, units=None):
    masked = (input_ids == tok.mask_id) & selected
    randomised = (input_ids != batch.ids) & selected & ~masked
    kept = (input_ids == batch.ids) & selected
    n = selected.sum().item() if units is None else units
    fractions = [(x.sum().item() if units is None else x) / n for x in (masked, randomised, kept)]
    for got, want in zip(fractions, (0.8, 0.1, 0.1)):
        assert abs(got - want) < 0.03, fractions


@pytest.mark.parametrize("strategy", ["token", "whole_word", "span"])
def test_rate_and_replacements(tok, batch, strategy):
    cfg = MaskingConfig(strategy=strategy)
    input_ids, labels = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(0))
    eligible, selected = _check_common(batch, tok, input_ids, labels)
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.015, rate
    if strategy == "token":
        _check_80_10_10(batch, tok, input_ids, selected)


@pytest.mark.parametrize("strategy", ["token", "whole_word", "span"])
def test_seeded(tok, batch, strategy):
    cfg = MaskingConfig(strategy=strategy)
    a = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(7))
    b = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(7))
    c = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("strategy", ["whole_word", "span"])
def test_whole_words_and_per_unit_decision(tok, batch, strategy):
    """Every word is selected with all its pieces or not at all; 80/10/10 applies to the whole unit."""
    g = torch.Generator().manual_seed(3)
    cfg = MaskingConfig(strategy=strategy)
    unit = select_units(batch, tok, cfg, g)
    input_ids, labels = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(labels != IGNORE_INDEX, unit >= 0)  # same draws, same selection
    word, eligible = _word_ids(batch), maskable(batch, tok)
    multi_piece_words = 0
    decisions = {"mask": 0, "other": 0}
    for row in range(batch.ids.shape[0]):
        for w in word[row][eligible[row]].unique().tolist():
            at = eligible[row] & (word[row] == w)
            assert unit[row, at].unique().numel() == 1  # all pieces in one unit, or all unselected
            multi_piece_words += int(at.sum() > 1)
        for u in unit[row][unit[row] >= 0].unique().tolist():
            masked = input_ids[row, unit[row] == u] == tok.mask_id
            assert masked.all() or not masked.any()  # one decision per unit
            decisions["mask" if masked.all() else "other"] += 1
    assert multi_piece_words > 1000
    units = decisions["mask"] + decisions["other"]
    assert abs(decisions["mask"] / units - 0.8) < 0.04, decisions


def test_whole_word_random_and_kept_split(tok, batch):
    # Per-word 10/10: count words (not tokens) whose pieces were randomised vs kept.
    cfg = MaskingConfig(strategy="whole_word", probability=0.5)  # more words for tighter statistics
    unit = select_units(batch, tok, cfg, torch.Generator().manual_seed(11))
    input_ids, _ = mask_tokens(batch, tok, cfg, torch.Generator().manual_seed(11))
    counts = {"mask": 0, "random": 0, "kept": 0}
    for row in range(batch.ids.shape[0]):
        for u in unit[row][unit[row] >= 0].unique().tolist():
            at = unit[row] == u
            if (input_ids[row, at] == tok.mask_id).all():
                counts["mask"] += 1
            elif torch.equal(input_ids[row, at], batch.ids[row, at]):
                counts["kept"] += 1
            else:
                counts["random"] += 1
    total = sum(counts.values())
    for key, want in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(counts[key] / total - want) < 0.03, counts


def test_span_budget_and_alignment(tok, batch):
    cfg = MaskingConfig(strategy="span")
    unit = select_units(batch, tok, cfg, torch.Generator().manual_seed(5))
    word, eligible = _word_ids(batch), maskable(batch, tok)
    for row in range(batch.ids.shape[0]):
        n = int(eligible[row].sum())
        if n == 0:
            assert not (unit[row] >= 0).any()
            continue
        budget = max(1, int(0.15 * n + 0.5))  # round half up
        taken = int((unit[row] >= 0).sum())
        pieces = torch.bincount(word[row][eligible[row]])
        # Stops once the budget is met, finishing the current word: overshoot < the longest word.
        assert budget <= taken < budget + int(pieces.max()), (row, budget, taken)
        # Runs start and end on word boundaries.
        sel = unit[row] >= 0
        starts = sel & ~torch.roll(sel, 1)
        assert batch.word_start[row][starts].all()
        ends = sel & ~torch.roll(sel, -1)
        next_is_start = torch.roll(batch.word_start[row] | ~eligible[row], -1)
        assert next_is_start[ends].all()


def test_span_length_distribution(tok):
    """First span of each row vs the exact expectation of SpanBERT's length law, end clipping included.

    75 one-piece words per row: the budget round(0.15 * 75) = 11 exceeds max_span, so the first span
    is never cut by the budget, only by the end of the row (start uniform over the 75 words).
    """
    p, max_span, n_words = 0.2, 10, 75
    weights = [p * (1 - p) ** (k - 1) for k in range(1, max_span + 1)]
    law = [w / sum(weights) for w in weights]  # SpanBERT's code renormalises on 1..10
    assert abs(sum(k * q for k, q in zip(range(1, 11), law)) - 3.7971) < 1e-4  # the paper's "3.8"
    clipped_mean = sum(min(k, 10) * p * (1 - p) ** (k - 1) for k in range(1, 2000))  # min(geo, 10): 4.46
    expected = sum(q * min(k, n_words - s) for s in range(n_words) for k, q in zip(range(1, 11), law)) / n_words
    rng = random.Random(0)
    one_piece = ["a", "photo", "of", "the", "dog", "cat", "red", "blue", "car", "street", "beach"]
    batch = tok.encode([" ".join(rng.choice(one_piece) for _ in range(n_words)) for _ in range(3000)])
    assert (batch.lengths == 77).all() and batch.word_start.sum(1).eq(n_words).all()
    unit = select_units(batch, tok, MaskingConfig(strategy="span"), torch.Generator().manual_seed(0))
    first = (unit == 0).sum(1).double()  # words in span 0 of each row
    assert abs(first.mean().item() - expected) < 0.12, (first.mean().item(), expected)
    assert abs(first.mean().item() - clipped_mean) > 0.5
    assert abs((first == 1).double().mean().item() - law[0]) < 0.025  # P(1 word) = 0.2 / 0.8926
    assert first.max().item() == 10


def test_short_rows_always_get_a_target(tok):
    texts = ["a", "dog", "a cat", "zebrafish", "", "<mask>", "a <mask> cat"]
    batch = tok.encode(texts * 50)
    for strategy in ("token", "whole_word", "span"):
        for seed in range(5):
            _, labels = mask_tokens(batch, tok, MaskingConfig(strategy=strategy), torch.Generator().manual_seed(seed))
            per_row = (labels != IGNORE_INDEX).sum(1).view(50, len(texts))
            assert (per_row[:, [0, 1, 2, 3, 6]] >= 1).all(), strategy
            assert (per_row[:, [4, 5]] == 0).all()  # nothing maskable: "" and a lone literal <mask>
            if strategy == "whole_word":  # zebrafish = zebra|fish: the forced word brings both pieces
                assert (per_row[:, 3] == 2).all()


def test_ar_targets_hand_built():
    # Row 0: "a photo"; row 1: a real "!" (id 0) that must be a target, unlike the padding after it.
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0], [49406, 0, 49407, 0, 0, 0], [49406, 49407, 0, 0, 0, 0]])
    lengths = torch.tensor([4, 3, 2])
    batch = TokenBatch(ids=ids, lengths=lengths, eot_index=lengths - 1, word_start=torch.zeros_like(ids, dtype=torch.bool))
    input_ids, labels = ar_targets(batch)
    assert torch.equal(input_ids, ids)
    assert labels.tolist() == [[320, 1125, 49407, -100, -100, -100],
                               [0, 49407, -100, -100, -100, -100],
                               [49407, -100, -100, -100, -100, -100]]


@pytest.mark.parametrize("kwargs, field", [
    ({"probability": 0.0}, "probability"), ({"strategy": "words"}, "strategy"),
    ({"mask_fraction": 0.95, "random_fraction": 0.1}, "random_fraction"), ({"span_p": 0.0}, "span_p"),
    ({"max_span": 0}, "max_span"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"masking.{field}"):
        MaskingConfig(**kwargs)
