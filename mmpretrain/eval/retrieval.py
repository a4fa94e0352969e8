"""Image-text retrieval metrics on embeddings, CLIP_benchmark style, without the N x N score matrix.

Several captions may describe one image (a ``.json`` "captions" list, or the lines of a ``.txt``).
What counts as a positive is POSITIVES (see `group_captions`, `caption_pairs`):

* ``sample`` (default): every sample is its own image with its own captions, as CLIP_benchmark and
  open_clip_train score; two samples holding the same picture are two images.
* ``image``: samples whose image content hash is equal are one image with all of their captions.
* ``caption``: as ``sample``, and a caption is also a positive of every image that has a caption with
  exactly the same text (two images both captioned "A frog." are each other's hits, both directions).

A query hits at k if any of its positives is in its top k. Text -> image averages over captions,
image -> text over images (the best-ranked positive counts).

Keys are ordered by score descending, ties by key index ascending, so the rank of positive p for
query q is ``1 + #{j: s_j > s_p} + #{j < p: s_j == s_p}``. CLIP_benchmark takes ``torch.topk``'s
order, which leaves exact ties unspecified: the two can differ only when a positive ties, bit for
bit, with another key at the k-th place. Scores are dot products of the embeddings as given (the
caller normalises). Queries are scored in chunks of ``chunk_size`` rows against all keys: memory is
O(max(chunk_size, GEMM_ROWS) x N), never N x N.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mmpretrain.config import Positives, choices
from mmpretrain.errors import UserError

DEFAULT_KS = (1, 5, 10)
POSITIVES: tuple[str, ...] = choices(Positives)  # what a query's positives are (module docstring)
# Every score comes from a GEMM of exactly GEMM_ROWS query rows (aligned at its multiples), never from
# a GEMM shaped by chunk_size: MKL rounds a 7-row product differently from a 64-row one (measured: 70-90%
# of float32 entries differ by 1 ulp, float64 too), which would let chunk_size move near-ties. With fixed
# blocks each score has the same bits whatever the chunking. 256 rows run at ~80% of a 1024-row GEMM's
# speed (64 rows: ~50%, measured at N = 66k, d = 512) and set the memory floor at 256 x N scores.
GEMM_ROWS = 256


class EvalInputError(UserError, ValueError):
    """Evaluation input that cannot be scored (no samples, bad label, mismatched sizes).

    A ValueError for library callers; a UserError so the CLI prints its one-line message."""


class CaptionGroups(NamedTuple):
    text_to_image: Tensor  # (Nt,) long: the image of each caption, images numbered by first appearance
    image_rows: Tensor  # (Ni,) long: the first caption row of each image, to pick image embeddings


def group_captions(image_keys: Sequence[Hashable]) -> CaptionGroups:
    """Group captions by image: one key per caption (e.g. the image's sha256), equal keys = one image.

    A sample with a list of captions passes its key once per caption. Images are numbered in order of
    first appearance, so ``image_emb = per_caption_image_emb[groups.image_rows]`` lines up.
    """
    index: dict[Hashable, int] = {}
    text_to_image, image_rows = [], []
    for row, key in enumerate(image_keys):
        if key not in index:
            index[key] = len(image_rows)
            image_rows.append(row)
        text_to_image.append(index[key])
    return CaptionGroups(torch.tensor(text_to_image, dtype=torch.long),
                         torch.tensor(image_rows, dtype=torch.long))


class RetrievalPositives(NamedTuple):
    image_rows: Tensor  # (Ni,) long: the sample whose image embedding stands for each image
    text_to_image: Tensor  # (Nt,) long: the image of each caption
    pairs: tuple[Tensor, Tensor] | None  # (pair_text, pair_image) (P,) when positives go beyond text_to_image


def retrieval_positives(positives: str, text_sample: Tensor, sample_hashes: Sequence[Hashable],
                        captions: Sequence[str]) -> RetrievalPositives:
    """Images and positives for POSITIVES (module docstring) from per-caption sample rows.

    text_sample (Nt,): the sample row of each caption, grouped by sample (non-decreasing);
    sample_hashes (S,): each sample's image content hash; captions (Nt,): the caption texts.
    """
    if positives not in POSITIVES:
        raise EvalInputError(f"retrieval: positives {positives!r}: choose one of {', '.join(POSITIVES)}")
    text_sample = torch.as_tensor(text_sample, dtype=torch.long)
    if positives == "image":
        groups = group_captions([sample_hashes[s] for s in text_sample.tolist()])
        return RetrievalPositives(text_sample[groups.image_rows], groups.text_to_image, None)
    image_rows, text_to_image = torch.unique(text_sample, return_inverse=True)  # samples with captions
    if positives == "sample":
        return RetrievalPositives(image_rows, text_to_image, None)
    return RetrievalPositives(image_rows, text_to_image, caption_pairs(captions, text_to_image))


def caption_pairs(captions: Sequence[str], text_to_image) -> tuple[Tensor, Tensor]:
    """(pair_text, pair_image) (P,) long: caption t is a positive of every image that has a caption
    with exactly t's text (its own image included), for ``positives="caption"``.

    A text shared by n captions on m images gives n x m pairs: a caption repeated on most of a large
    set (e.g. "image") makes this quadratic in that caption's count.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(captions) != len(t2i):
        raise EvalInputError(f"caption_pairs: {len(captions)} captions but {len(t2i)} text_to_image entries")
    images_of: dict[str, dict[int, None]] = {}  # text -> its images, in first-seen order
    for text, image in zip(captions, t2i.tolist()):
        images_of.setdefault(text, {})[image] = None
    pair_text, pair_image = [], []
    for t, text in enumerate(captions):
        for image in images_of[text]:
            pair_text.append(t)
            pair_image.append(image)
    return torch.tensor(pair_text, dtype=torch.long), torch.tensor(pair_image, dtype=torch.long)


# -- input checks ----------------------------------------------------------------------------------
def check_embeddings(what: str, query_name: str, query: Tensor, key_name: str,
                     key: Tensor) -> tuple[Tensor, Tensor]:
    """Both (N, d) with the same d, N >= 1, finite; returned in one float dtype (float64 if either is)."""
    for name, emb in ((query_name, query), (key_name, key)):
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise EvalInputError(f"{what}: {name} must be a 2-D (N, d) tensor, got {shape}")
        if len(emb) == 0:
            raise EvalInputError(f"{what}: {name} has no rows; there is nothing to evaluate")
        if not emb.is_floating_point():
            raise EvalInputError(f"{what}: {name} must hold floats, got {emb.dtype}")
    if query.shape[1] != key.shape[1]:
        raise EvalInputError(f"{what}: {query_name} is {tuple(query.shape)} but {key_name} is "
                             f"{tuple(key.shape)}; both need the same embedding width")
    dtype = torch.float64 if torch.float64 in (query.dtype, key.dtype) else torch.float32
    query, key = query.to(dtype), key.to(dtype)
    for name, emb in ((query_name, query), (key_name, key)):
        bad = (~torch.isfinite(emb).all(1)).nonzero()
        if len(bad):
            raise EvalInputError(f"{what}: {name} row {bad[0].item()} is not finite (NaN or inf); "
                                 f"check the model's output")
    return query, key


def check_indices(what: str, name: str, values, length: int, length_name: str, bound: int,
                  bound_name: str) -> Tensor:
    """A 1-D integer tensor of `length` values, each in [0, bound)."""
    is_empty_list = not isinstance(values, Tensor) and len(values) == 0  # as_tensor would make it float
    values = torch.zeros(0, dtype=torch.long) if is_empty_list else torch.as_tensor(values)
    if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise EvalInputError(f"{what}: {name} must be a 1-D tensor of integers, got {values.dtype} "
                             f"of shape {tuple(values.shape)}")
    if len(values) != length:
        raise EvalInputError(f"{what}: {name} has {len(values)} entries but {length_name} has {length} rows; "
                             f"give one per row")
    bad = ((values < 0) | (values >= bound)).nonzero()
    if len(bad):
        i = bad[0].item()
        raise EvalInputError(f"{what}: {name}[{i}] = {values[i].item()} is out of range for {bound} "
                             f"{bound_name} (0..{bound - 1})")
    return values.long()


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) query ranges. From GEMM_ROWS up they are cut at block boundaries, so no block is
    computed twice; results do not depend on where the cuts fall (see GEMM_ROWS)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise EvalInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    step = chunk_size if chunk_size < GEMM_ROWS else chunk_size // GEMM_ROWS * GEMM_ROWS
    return [(start, min(start + step, n)) for start in range(0, n, step)]


# -- scoring and ranking ---------------------------------------------------------------------------
def _score_rows(query: Tensor, key: Tensor, start: int, stop: int) -> Tensor:
    """(stop - start, Nk) scores of query rows [start, stop) against every key, from fixed-size GEMMs."""
    lo = start // GEMM_ROWS * GEMM_ROWS
    hi = min(-(-stop // GEMM_ROWS) * GEMM_ROWS, len(query))
    out = torch.empty(hi - lo, len(key), dtype=query.dtype)  # (rows of the aligned blocks, Nk)
    for b in range(lo, hi, GEMM_ROWS):
        e = min(b + GEMM_ROWS, hi)
        torch.mm(query[b:e], key.T, out=out[b - lo:e - lo])
    return out[start - lo:stop - lo]


def _chunk_ranks(scores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(c,) rank of each row's best positive; positives are the (rows[p], cols[p]) entries of scores."""
    c, nk = scores.shape
    pos = scores[rows, cols]  # (P,)
    best = torch.full((c,), -torch.inf, dtype=scores.dtype).scatter_reduce(0, rows, pos, "amax")
    # Among positives that reach the best score the lowest key index ranks first: that one counts.
    first = pos == best[rows]
    best_key = torch.full((c,), nk, dtype=torch.long).scatter_reduce(0, rows[first], cols[first], "amin")
    # Counted in numpy: its compare + int32 sum is ~4x faster than torch's here (measured 72 vs 286 ms
    # for 1024 x 66.9k float32 scores), and this counting is as costly as the GEMM otherwise.
    s, b = scores.numpy(), best.numpy()[:, None]
    above = torch.from_numpy((s > b).sum(1, dtype=np.int32))
    tied = torch.from_numpy((s == b).sum(1, dtype=np.int32))  # includes the best positive itself
    ranks = 1 + above.long()
    fix = (tied > 1).nonzero().squeeze(1)  # rare: other keys share the best score, count those before it
    if len(fix):
        keys = torch.arange(nk)[None, :]  # (1, Nk)
        before = (scores[fix] == best[fix, None]) & (keys < best_key[fix, None])  # (F, Nk)
        ranks[fix] += before.sum(1)
    return ranks


def positive_ranks(query_emb: Tensor, key_emb: Tensor, pair_query: Tensor, pair_key: Tensor, *,
                   chunk_size: int = 1024) -> Tensor:
    """(Nq,) long: 1-based rank of each query's best positive key among all keys.

    Positives are the pairs (pair_query[p], pair_key[p]); every query needs at least one. Embeddings
    must already be checked and in one dtype (see check_embeddings).
    """
    chunks = _chunks(len(query_emb), chunk_size)
    nq = len(query_emb)
    missing = (torch.bincount(pair_query, minlength=nq) == 0).nonzero()
    if len(missing):
        raise EvalInputError(f"query {missing[0].item()} has no positive key")
    order = torch.argsort(pair_query, stable=True)
    pq, pk = pair_query[order], pair_key[order]  # (P,) pairs sorted by query
    offsets = torch.searchsorted(pq, torch.arange(nq + 1)).tolist()  # query q: pairs offsets[q]:offsets[q+1]
    ranks = torch.empty(nq, dtype=torch.long)
    for start, stop in chunks:
        lo, hi = offsets[start], offsets[stop]
        scores = _score_rows(query_emb, key_emb, start, stop)  # (c, Nk)
        ranks[start:stop] = _chunk_ranks(scores, pq[lo:hi] - start, pk[lo:hi])
    return ranks


def top_k(query_emb: Tensor, key_emb: Tensor, k: int, *, chunk_size: int = 1024) -> Tensor:
    """(Nq, min(k, Nk)) long: each query's best keys, best first, ties to the lower key index.

    Sorts each query's full score row (O(Nk log Nk)): meant for a few report queries or for class
    predictions, not for ranking every caption of a large set (use positive_ranks for that).
    """
    query_emb, key_emb = check_embeddings("top_k", "query_emb", query_emb, "key_emb", key_emb)
    chunks = _chunks(len(query_emb), chunk_size)
    if not isinstance(k, int) or k < 1:
        raise EvalInputError(f"top_k: k must be a positive integer, got {k!r}")
    k = min(k, len(key_emb))
    out = torch.empty(len(query_emb), k, dtype=torch.long)
    for start, stop in chunks:
        scores = _score_rows(query_emb, key_emb, start, stop)  # (c, Nk)
        # stable: equal scores keep key order, which is the tie rule
        out[start:stop] = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return out


# -- retrieval -------------------------------------------------------------------------------------
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image, *, pairs: tuple | None = None,
                    chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(image_to_text (Ni,), text_to_image (Nt,)) 1-based ranks of each query's best positive.

    Positives are each caption's image (text_to_image), or the (pair_text, pair_image) `pairs` when
    given (see caption_pairs; they must include each caption's own image).
    """
    image_emb, text_emb = check_embeddings("retrieval", "image_emb", image_emb, "text_emb", text_emb)
    ni, nt = len(image_emb), len(text_emb)
    t2i = check_indices("retrieval", "text_to_image", text_to_image, nt, "text_emb", ni, "images")
    captionless = (torch.bincount(t2i, minlength=ni) == 0).nonzero()
    if len(captionless):
        raise EvalInputError(f"retrieval: image {captionless[0].item()} has no caption; every image needs "
                             f"at least one (drop it, or map its captions to it in text_to_image)")
    pair_text, pair_image = torch.arange(nt), t2i
    if pairs is not None:
        pair_text = check_indices("retrieval", "pairs[0]", pairs[0], len(pairs[0]), "pairs[0]", nt, "captions")
        pair_image = check_indices("retrieval", "pairs[1]", pairs[1], len(pair_text), "pairs[0]", ni, "images")
    i2t_ranks = positive_ranks(image_emb, text_emb, pair_image, pair_text, chunk_size=chunk_size)
    t2i_ranks = positive_ranks(text_emb, image_emb, pair_text, pair_image, chunk_size=chunk_size)
    return i2t_ranks, t2i_ranks


def rank_summary(ranks: Tensor, prefix: str, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{prefix}R@k`` (fraction of ranks <= k), ``{prefix}mean_rank``, ``{prefix}median_rank``.

    The median of an even count is the mean of the two middle ranks.
    """
    out = {f"{prefix}R@{k}": (ranks <= k).double().mean().item() for k in ks}
    ordered = ranks.sort().values
    n = len(ordered)
    out[f"{prefix}mean_rank"] = ranks.double().mean().item()
    out[f"{prefix}median_rank"] = (ordered[(n - 1) // 2] + ordered[n // 2]).item() / 2
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image, *, ks: Sequence[int] = DEFAULT_KS,
                      pairs: tuple | None = None, chunk_size: int = 1024) -> dict[str, float | int]:
    """R@k, mean and median rank in both directions, CLIP_benchmark semantics (see module docstring).

    image_emb (Ni, d), text_emb (Nt, d), text_to_image (Nt,): the image index of each caption (see
    group_captions, retrieval_positives); `pairs`: positives beyond text_to_image (see retrieval_ranks).
    Keys: ``image_to_text_R@{k}``, ``image_to_text_mean_rank``, ``image_to_text_median_rank``, the same
    with ``text_to_image_``, ``num_images``, ``num_texts``.
    """
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise EvalInputError(f"retrieval: ks must be positive integers, got {list(ks)!r}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, pairs=pairs, chunk_size=chunk_size)
    return {**rank_summary(i2t, "image_to_text_", ks), **rank_summary(t2i, "text_to_image_", ks),
            "num_images": len(i2t), "num_texts": len(t2i)}
