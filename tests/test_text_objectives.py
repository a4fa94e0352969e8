"""Sentence pairs (NSP, SOP) and the text-branch batch dict."""

import pytest
import torch

from mmpretrain.data.records import SentencePairs, TextBatch
from mmpretrain.data.text.masking import IGNORE_INDEX, MaskingConfig
from mmpretrain.data.text.objectives import make_sentence_pairs, split_document, split_sentences, text_batch
from mmpretrain.data.text.tokenizer import Tokenizer


def _documents(n: int) -> list[str]:
    # Sentence j of document i says "dI sJ", so any segment names the document it came from.
    return [" ".join(f"d{i} s{j} words here." for j in range(2 + i % 4)) for i in range(n)]


def _doc_of(segment: str) -> set[str]:
    return {w for w in segment.split() if w.startswith("d")}


def test_split_sentences_and_documents():
    assert split_sentences("A cat sits. A dog runs! Why? Yes.") == ["A cat sits.", "A dog runs!", "Why?", "Yes."]
    assert split_sentences("Version 1.5 is out.") == ["Version 1.5 is out."]
    assert split_document("One. Two. Three.", 0.0) == ("One.", "Two. Three.")
    assert split_document("One. Two. Three.", 0.99) == ("One. Two.", "Three.")
    # One sentence: the word boundary nearest the middle.
    assert split_document("a small red car parked near the old stone bridge", 0.3) == (
        "a small red car parked", "near the old stone bridge")
    assert split_document("a small red car", 0.3) == ("a small", "red car")
    assert split_document("car", 0.3) == ("car", "")


def test_nsp_labels_and_negatives():
    docs = _documents(1000)
    first, second, labels = make_sentence_pairs(docs, "nsp", torch.Generator().manual_seed(0))
    assert labels.dtype == torch.long and labels.shape == (1000,)
    assert abs(labels.double().mean().item() - 0.5) < 0.05
    for i, (a, b, y) in enumerate(zip(first, second, labels.tolist())):
        assert a and b and _doc_of(a) == {f"d{i}"}
        if y == 1:
            assert f"{a} {b}" == docs[i]  # A then its true continuation
        else:
            (source,) = _doc_of(b)
            j = int(source[1:])
            assert j != i and docs[j].endswith(b)  # a B segment of another document


def test_sop_negatives_are_exact_swaps():
    docs = _documents(1000)
    first, second, labels = make_sentence_pairs(docs, "sop", torch.Generator().manual_seed(1))
    assert abs(labels.double().mean().item() - 0.5) < 0.05
    for doc, a, b, y in zip(docs, first, second, labels.tolist()):
        assert a and b
        assert (f"{a} {b}" if y == 1 else f"{b} {a}") == doc


def test_pairs_are_seeded():
    docs = _documents(50)
    run = [make_sentence_pairs(docs, "nsp", torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert run[0][:2] == run[1][:2] and torch.equal(run[0][2], run[1][2])
    assert run[0][:2] != run[2][:2]


def test_pair_errors():
    with pytest.raises(ValueError, match="at least 2 documents"):
        make_sentence_pairs(["one doc. two."], "nsp", torch.Generator())
    with pytest.raises(ValueError, match="not one of"):
        make_sentence_pairs(["a. b."], "mlm", torch.Generator())


def test_text_batch_contents():
    tok = Tokenizer(context_length=32)
    texts = ["A red car parks near the bridge. It is raining.", "Two zebrafish swim in a tank.", "!\"$ a"]
    out = text_batch(texts, tok, MaskingConfig(), torch.Generator().manual_seed(0), pair_objective="sop")
    assert isinstance(out, TextBatch) and isinstance(out.pairs, SentencePairs) and out.texts == texts
    for name in ("mlm_input_ids", "mlm_labels", "ar_input_ids", "ar_labels", "attention_mask"):
        assert getattr(out, name).shape == (3, 32), name
    for name in ("input_ids", "segment_ids", "attention_mask"):
        assert getattr(out.pairs, name).shape == (3, 32), name
    plain = tok.encode(texts)
    assert torch.equal(out.ar_input_ids, plain.ids) and torch.equal(out.lengths, plain.lengths)
    assert out.eot_index.tolist() == (plain.lengths - 1).tolist()
    assert out.attention_mask.sum(1).tolist() == plain.lengths.tolist()
    selected = out.mlm_labels != IGNORE_INDEX
    assert selected.any(1).all() and torch.equal(out.mlm_labels[selected], plain.ids[selected])
    ar = out.ar_labels
    assert ar[2, :5].tolist() == [0, 1, 259, 320, tok.eot_id] and ar[2, 5:].eq(IGNORE_INDEX).all()
    pair_ids, eot = out.pairs.input_ids, out.pairs.eot_index
    assert (pair_ids.gather(1, eot[:, None]) == tok.eot_id).all()
    assert (pair_ids == tok.sep_id).sum(1).tolist() == [1, 1, 1]
    assert out.pairs.segment_ids[out.pairs.attention_mask].unique().tolist() == [0, 1]
    assert out.pairs.labels.shape == (3,) and out.pairs.labels.dtype == torch.long
    without = text_batch(texts, tok, MaskingConfig(), torch.Generator().manual_seed(0))
    assert without.pairs is None and torch.equal(without.mlm_labels, out.mlm_labels)
