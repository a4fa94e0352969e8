"""Retrieval metrics against a brute-force reference (full score matrix, one Python sort per query),
hand-computed tiny cases, ties, chunk-size invariance and bad input."""

import pytest
import torch

from mmpretrain.errors import UserError
from mmpretrain.eval.retrieval import (
    GEMM_ROWS,
    _score_rows,
    group_captions,
    positive_ranks,
    retrieval_metrics,
    retrieval_ranks,
    top_k,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors and chunk_size 1 mean hundreds of tiny ops: with 2 threads on a busy machine each
    waits at an OpenMP barrier for the descheduled thread (measured 6.8 s against 0.6 s with 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- data ------------------------------------------------------------------------------------------
def _structure(num_images: int, seed: int) -> torch.Tensor:
    """(Nt,) image of each caption: 1-4 captions per image, captions in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    per_image = torch.randint(1, 5, (num_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(num_images), per_image)
    return t2i[torch.randperm(len(t2i), generator=g)]


def _continuous(num_images: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t2i = _structure(num_images, seed)
    image = torch.randn(num_images, dim, generator=g, dtype=torch.float64)
    image = torch.nn.functional.normalize(image, dim=1)
    text = image[t2i] + 0.9 * torch.randn(len(t2i), dim, generator=g, dtype=torch.float64) / dim**0.5
    return image.to(dtype), torch.nn.functional.normalize(text, dim=1).to(dtype), t2i


def _quantised(num_images: int, dim: int, seed: int, dtype=torch.float64):
    """Entries in {-1, -0.5, 0, 0.5, 1}: every dot product is exact in any summation order, and many
    scores tie. Some images and captions are exact duplicates of others (same picture, new bytes)."""
    g = torch.Generator().manual_seed(seed)
    t2i = _structure(num_images, seed)
    image = torch.randint(-2, 3, (num_images, dim), generator=g).double() / 2
    image[1::5] = image[0::5][: len(image[1::5])]
    text = torch.where(torch.rand(len(t2i), dim, generator=g) < 0.6, image[t2i],
                       torch.randint(-2, 3, (len(t2i), dim), generator=g).double() / 2)
    text[3::7] = text[2::7][: len(text[3::7])]
    return image.to(dtype), text.to(dtype), t2i


# -- hand-computed ---------------------------------------------------------------------------------
def test_hand_computed_ranks_with_ties():
    # S[i][t] = image_i . text_t:  I0 [1 0 2 1]   I1 [0 2 1 0]   I2 [1 2 3 1]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0], [1.0, 0.0]])
    t2i = torch.tensor([0, 1, 2, 2])
    i2t, t2i_ranks = retrieval_ranks(image, text, t2i)
    # I0: T2 scores above its caption T0 -> 2. I2: best of its captions T2 (3) -> 1.
    assert i2t.tolist() == [2, 1, 1]
    # T0 ties I0 with I2, its own I0 has the lower index -> 1. T3 ties its I2 with I0, which comes first -> 2.
    assert t2i_ranks.tolist() == [1, 1, 1, 2]
    m = retrieval_metrics(image, text, t2i)
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3) and m["text_to_image_R@1"] == 0.75
    assert m["image_to_text_mean_rank"] == pytest.approx(4 / 3) and m["text_to_image_mean_rank"] == 1.25
    assert m["image_to_text_R@5"] == m["text_to_image_R@10"] == 1.0
    assert (m["num_images"], m["num_texts"]) == (3, 4)


def test_hand_computed_all_tied_and_even_median():
    # I0 = (1, 0) scores 5 against every caption; its captions are T2 and T3, so T0 and T1 come first.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[5.0, 0.0], [5.0, 1.0], [5.0, 2.0], [5.0, 3.0]])
    t2i = torch.tensor([1, 1, 0, 0])
    i2t, t2i_ranks = retrieval_ranks(image, text, t2i)
    assert i2t.tolist() == [3, 3]  # I1: best caption T1 (1) is beaten by T2 (2) and T3 (3)
    assert t2i_ranks.tolist() == [2, 2, 1, 1]
    m = retrieval_metrics(image, text, t2i, ks=(1, 2, 3))
    assert (m["image_to_text_R@2"], m["image_to_text_R@3"]) == (0.0, 1.0)
    assert m["image_to_text_median_rank"] == 3.0
    assert m["text_to_image_median_rank"] == 1.5  # even count: mean of the two middle ranks


# -- against the reference -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_continuous, _quantised])
@pytest.mark.parametrize("num_images,dim,seed", [(1, 4, 0), (2, 3, 1), (37, 8, 2), (83, 16, 3)])
def test_matches_bruteforce(make, num_images, dim, seed, retrieval_reference):
    image, text, t2i = make(num_images, dim, seed)
    i2t, t2i_ranks = retrieval_ranks(image, text, t2i, chunk_size=5)
    ref_i2t, ref_t2i = retrieval_reference.ranks(image, text, t2i)
    assert i2t.tolist() == ref_i2t
    assert t2i_ranks.tolist() == ref_t2i
    metrics = retrieval_metrics(image, text, t2i, chunk_size=5)
    del metrics["num_images"], metrics["num_texts"]
    assert metrics == retrieval_reference.metrics(image, text, t2i)


def test_quantised_data_has_ties_that_matter():
    # Guard for the test above: the tie rule must decide ranks here, or the ties test nothing.
    image, text, t2i = _quantised(83, 16, 3)
    scores = image @ text.T  # (Ni, Nt)
    own = scores[t2i, torch.arange(len(t2i))]  # (Nt,)
    tied_with_own = (scores == own[None, :]).sum(0) - 1
    assert (tied_with_own > 0).sum() > 20


def test_float32_quantised_matches_bruteforce(retrieval_reference):
    image, text, t2i = _quantised(41, 8, 4, dtype=torch.float32)
    i2t, t2i_ranks = retrieval_ranks(image, text, t2i, chunk_size=3)
    assert (i2t.tolist(), t2i_ranks.tolist()) == retrieval_reference.ranks(image, text, t2i)


def test_power_of_two_scaling_keeps_ranks():
    # Extreme magnitudes: scaling by 2**k is exact, so ranks (ties included) must not move.
    image, text, t2i = _quantised(30, 8, 5)
    base = retrieval_ranks(image, text, t2i)
    for scale in (2.0**-60, 2.0**60):
        scaled = retrieval_ranks(image * scale, text * scale, t2i)
        assert all(torch.equal(a, b) for a, b in zip(base, scaled))


@pytest.mark.parametrize("make,dtype", [(_continuous, torch.float32), (_quantised, torch.float64)])
def test_chunk_size_changes_nothing(make, dtype):
    # > GEMM_ROWS queries so chunks cut through the fixed GEMM blocks; float32 continuous scores are
    # where a chunk-shaped GEMM would round differently (see GEMM_ROWS).
    image, text, t2i = make(GEMM_ROWS + 11, 16, 6, dtype=dtype)
    results = [retrieval_ranks(image, text, t2i, chunk_size=c) for c in (1, 3, 7, GEMM_ROWS, 300, 1000)]
    for ranks in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], ranks))


def test_scores_are_bitwise_independent_of_chunking():
    # The mechanism behind the test above: a GEMM shaped by the chunk (query[a:b] @ key.T) rounds 70-90%
    # of float32 entries differently from the full product on MKL (measured), so near-ties could flip;
    # the fixed GEMM_ROWS blocks give every score the same bits whatever the chunk boundaries.
    image, text, _ = _continuous(GEMM_ROWS + 11, 64, 11, dtype=torch.float32)
    whole = _score_rows(text, image, 0, len(text))
    for chunk in (1, 3, 7, 100):
        parts = [_score_rows(text, image, a, min(a + chunk, len(text))) for a in range(0, len(text), chunk)]
        assert torch.equal(torch.cat(parts), whole)


def test_mixed_precision_is_scored_in_float64():
    image, text, t2i = _continuous(20, 8, 7)
    mixed = retrieval_ranks(image.float(), text, t2i)
    assert all(torch.equal(a, b) for a, b in zip(mixed, retrieval_ranks(image.float().double(), text, t2i)))


# -- top_k and positive_ranks -----------------------------------------------------------------------
@pytest.mark.parametrize("k,chunk", [(1, 1), (5, 3), (6, 7), (100, 1000)])
def test_top_k_order_and_ties(k, chunk, retrieval_reference):
    image, text, _ = _quantised(29, 6, 8)
    got = top_k(text, image, k, chunk_size=chunk)
    assert got.shape == (len(text), min(k, len(image)))
    for row, scores in zip(got.tolist(), (text @ image.T).tolist()):
        assert row == retrieval_reference.sorted_keys(scores)[: len(row)]


def test_top_k_agrees_with_ranks():
    image, text, t2i = _quantised(50, 6, 9)
    first = top_k(text, image, 1)[:, 0]
    ranks = positive_ranks(text, image, torch.arange(len(text)), t2i)
    assert torch.equal(first == t2i, ranks == 1)


# -- grouping --------------------------------------------------------------------------------------
def test_group_captions_by_image_hash():
    groups = group_captions(["b", "a", "b", "c", "a", "a"])
    assert groups.text_to_image.tolist() == [0, 1, 0, 2, 1, 1]
    assert groups.image_rows.tolist() == [0, 1, 3]
    t2i, rows = group_captions([])
    assert t2i.tolist() == [] and rows.tolist() == []


def test_grouped_duplicate_samples_count_as_one_image():
    # Three samples of one picture (same hash) and one of another: two images, the first with 3 captions.
    per_sample_image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.2, 0.8], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    groups = group_captions(["h1", "h2", "h1", "h1"])
    m = retrieval_metrics(per_sample_image[groups.image_rows], text, groups.text_to_image)
    assert (m["num_images"], m["num_texts"]) == (2, 4)
    assert m["image_to_text_R@1"] == 1.0  # h1 hits through its third caption although the others miss
    assert m["text_to_image_R@1"] == 0.5


# -- bad input -------------------------------------------------------------------------------------
def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_bad_input_is_a_one_line_value_error():
    image, text, t2i = _continuous(5, 4, 10)
    _one_line_error("image_emb has no rows", retrieval_metrics, image[:0], text, t2i)
    _one_line_error("text_emb has no rows", retrieval_metrics, image, text[:0], t2i[:0])
    _one_line_error(r"text_to_image has \d+ entries but text_emb has \d+ rows", retrieval_metrics,
                    image, text, t2i[:-1])
    bad = t2i.clone()
    bad[2] = 5
    _one_line_error(r"text_to_image\[2\] = 5 is out of range for 5 images", retrieval_metrics,
                    image, text, bad)
    bad[2] = -1
    _one_line_error(r"text_to_image\[2\] = -1", retrieval_metrics, image, text, bad)
    _one_line_error("image 4 has no caption", retrieval_metrics, image, text[t2i != 4], t2i[t2i != 4])
    _one_line_error("same embedding width", retrieval_metrics, image[:, :3], text, t2i)
    _one_line_error("must be a 1-D tensor of integers", retrieval_metrics, image, text, t2i.float())
    _one_line_error(r"must be a 2-D \(N, d\) tensor", retrieval_metrics, image[0], text, t2i)
    nan = text.clone()
    nan[3, 1] = float("nan")
    _one_line_error("text_emb row 3 is not finite", retrieval_metrics, image, nan, t2i)
    _one_line_error("ks must be positive integers", retrieval_metrics, image, text, t2i, ks=(0, 5))
    _one_line_error("chunk_size must be a positive integer", retrieval_metrics,
                    image, text, t2i, chunk_size=0)
    _one_line_error("k must be a positive integer", top_k, text, image, 0)
