"""Text-branch batches: MLM and AR targets for a list of texts, plus optional sentence-pair tasks.

Sentence pairs follow BERT's next-sentence prediction ("nsp": B is the true continuation, label 1,
or a segment of another document, label 0) and ALBERT's sentence-order prediction ("sop": A then B,
label 1, or the same two segments swapped, label 0). Captions are often one sentence; those are
split at the word boundary nearest the middle.
"""

from __future__ import annotations

import re
from dataclasses import fields

import torch
from torch import Tensor

from mmpretrain.config import PairObjective, choices
from mmpretrain.data.records import SentencePairs, TextBatch
from mmpretrain.data.text.masking import MaskingConfig, ar_targets, mask_tokens
from mmpretrain.data.text.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(document: str) -> list[str]:
    """Sentences of a document: split after `.`, `!` or `?` followed by whitespace."""
    return [s for s in _SENTENCE_END.split(document.strip()) if s]


def split_document(document: str, choice: float) -> tuple[str, str]:
    """(A, B): consecutive sentences before / after a split point picked by `choice` in [0, 1).

    A one-sentence document is split at the word boundary nearest its middle; a one-word document
    gives B = "" (nothing to split), which the pair encoding keeps as an empty segment.
    """
    sentences = split_sentences(document)
    if len(sentences) >= 2:
        cut = 1 + int(choice * (len(sentences) - 1))  # 1 .. n-1: both sides non-empty
        return " ".join(sentences[:cut]), " ".join(sentences[cut:])
    words = document.split()
    middle = len(words) // 2 if len(words) >= 2 else len(words)
    return " ".join(words[:middle]), " ".join(words[middle:])


def make_sentence_pairs(documents: list[str], objective: str,
                        generator: torch.Generator) -> tuple[list[str], list[str], Tensor]:
    """(first, second, labels): label 1 = true order/continuation, 0 = swapped (sop) or foreign B (nsp)."""
    if objective not in choices(PairObjective):
        raise ValueError(f"pair objective {objective!r} is not one of {', '.join(choices(PairObjective))}")
    n = len(documents)
    if objective == "nsp" and n < 2:
        raise ValueError("nsp needs at least 2 documents per batch to draw a negative from another one")
    # Fixed number of draws per call, whatever the documents say: replayable from the seed.
    cuts = torch.rand(n, generator=generator).tolist()
    negative = (torch.rand(n, generator=generator) < 0.5).tolist()
    other = torch.randint(0, max(n - 1, 1), (n,), generator=generator).tolist()
    splits = [split_document(doc, c) for doc, c in zip(documents, cuts)]
    first, second, labels = [], [], []
    for i, (a, b) in enumerate(splits):
        if negative[i] and objective == "sop":
            a, b = b, a
        elif negative[i]:  # nsp: the B segment of a different document (index != i)
            b = splits[other[i] + (other[i] >= i)][1]
        first.append(a)
        second.append(b)
        labels.append(0 if negative[i] else 1)
    return first, second, torch.tensor(labels, dtype=torch.long)


def text_batch(texts: list[str], tokenizer: Tokenizer, masking_cfg: MaskingConfig,
               generator: torch.Generator, pair_objective: str | None = None) -> TextBatch:
    """The text branch's batch: MLM and AR views of `texts`, and sentence pairs when asked."""
    batch = tokenizer.encode(texts)
    mlm_input_ids, mlm_labels = mask_tokens(batch, tokenizer, masking_cfg, generator)
    ar_input_ids, ar_labels = ar_targets(batch)
    pairs = None
    if pair_objective is not None:
        first, second, labels = make_sentence_pairs(texts, pair_objective, generator)
        encoded = tokenizer.encode_pair(first, second)
        pairs = SentencePairs(input_ids=encoded.ids, segment_ids=encoded.segment_ids,
                              attention_mask=encoded.attention_mask, eot_index=encoded.eot_index, labels=labels)
    return TextBatch(mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels, ar_input_ids=ar_input_ids,
                     ar_labels=ar_labels, attention_mask=batch.attention_mask, eot_index=batch.eot_index,
                     lengths=batch.lengths, pairs=pairs, texts=list(texts))


def sample_text_batch(texts: list[str], seeds: list[int], tokenizer: Tokenizer, masking_cfg: MaskingConfig,
                      pair_objective: str | None = None) -> TextBatch:
    """`text_batch` with each text masked (and, for "sop", split and swapped) by its own generator,
    seeded by `seeds`: a text's views do not depend on which batch or process it lands in. NSP draws
    its negatives from the other texts of the batch, so its pairs use one generator, from seeds[0]."""
    if not texts:
        return text_batch([], tokenizer, masking_cfg, torch.Generator(), None)
    per_row = None if pair_objective == "nsp" else pair_objective
    batch = concat_text_batches([text_batch([text], tokenizer, masking_cfg, torch.Generator().manual_seed(seed),
                                            per_row) for text, seed in zip(texts, seeds)])
    if pair_objective == "nsp":
        generator = torch.Generator().manual_seed(seeds[0] ^ 0x5EED)
        first, second, labels = make_sentence_pairs(texts, pair_objective, generator)
        encoded = tokenizer.encode_pair(first, second)
        batch.pairs = SentencePairs(input_ids=encoded.ids, segment_ids=encoded.segment_ids,
                                    attention_mask=encoded.attention_mask, eot_index=encoded.eot_index,
                                    labels=labels)
    return batch


def concat_text_batches(rows: list[TextBatch]) -> TextBatch:
    """Row-wise concatenation of text batches (all with or all without pairs)."""
    def cat(name: str, part=lambda r: r) -> Tensor:
        return torch.cat([getattr(part(r), name) for r in rows])

    pairs = None
    if rows[0].pairs is not None:
        pairs = SentencePairs(**{f.name: cat(f.name, lambda r: r.pairs) for f in fields(SentencePairs)})
    tensors = {f.name: cat(f.name) for f in fields(TextBatch) if f.name not in ("pairs", "texts", "keys")}
    return TextBatch(**tensors, pairs=pairs, texts=[t for r in rows for t in r.texts],
                     keys=[k for r in rows for k in r.keys])
