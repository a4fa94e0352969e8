"""Tokenizer: open_clip's ids for plain captions, lengths as the only truth about padding, pairs."""

import importlib.util
import pickle
import random
import string
from pathlib import Path

import pytest
import torch

from mmpretrain.data.text.tokenizer import Tokenizer, open_clip_tokenizer_module, truncate_pair

# open_clip's own tokenizer.py (loaded without open_clip/__init__, which imports torchvision + timm).
OC = open_clip_tokenizer_module()

SOT, EOT, MASK, SEP = 49406, 49407, 49408, 49409


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


CAPTIONS = [
    "A photo of a cat.",
    "  Two   dogs\tplaying\nin the PARK!  ",
    "Café au lait, naïve façade — 東京 🚀 emoji",
    "Fish &amp; chips &lt;3 &amp;amp; more",
    "control\x01chars\x7f and \x1b[31mred\x1b[0m terminal codes",
    "",
    "mmpretrain tokenizes captions; it's 2024, isn't it?",
    " ".join(["a long caption about a very long walk along the beach"] * 12),  # > 77 tokens
]


def test_special_ids_and_vocab(tok):
    assert (tok.sot_id, tok.eot_id, tok.mask_id, tok.sep_id, tok.pad_id) == (SOT, EOT, MASK, SEP, 0)
    assert tok.vocab_size == 49410
    assert set(tok.special_ids) == {SOT, EOT, MASK, SEP}
    assert tok.word_end.shape == (49410,) and tok.is_special.sum() == 4
    assert tok.decode([SOT, MASK, SEP, EOT]) == "<mask> <sep>"


def test_reference_is_the_installed_open_clip_file():
    package_dir = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    assert Path(OC.__file__) == package_dir / "tokenizer.py"


def test_plain_captions_match_open_clip(tok):
    batch = tok.encode(CAPTIONS)
    assert torch.equal(batch.ids, OC.tokenize(CAPTIONS))  # open_clip.tokenize: stock tokenizer, 77 tokens
    long_row = batch.ids[-1]
    assert batch.lengths[-1] == 77 and long_row[-1] == EOT  # truncated to bpe[:75] + eot
    short = Tokenizer(context_length=16)
    ref = OC.SimpleTokenizer(additional_special_tokens=["<mask>", "<sep>"])(CAPTIONS, context_length=16)
    assert torch.equal(short.encode(CAPTIONS).ids, ref)
    assert short.encode(CAPTIONS).lengths.tolist() == [8, 9, 16, 9, 9, 2, 16, 16]


def test_ascii_fast_path_cleans_like_ftfy(tok):
    # The ASCII fast path skips ftfy; it must give open_clip's cleaning for every such string.
    rng = random.Random(0)
    alphabet = string.printable.replace("&", "")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tok._clean(text) == OC._clean_lower(text), repr(text)


def test_lengths_not_zero_ids_define_padding(tok):
    # '!"$' is three real tokens 0, 1, 259: id 0 is "!", the same id as padding.
    batch = tok.encode(['!"$', "a cat"])
    assert batch.ids[0, :6].tolist() == [SOT, 0, 1, 259, EOT, 0]
    assert batch.lengths.tolist() == [5, 4]
    assert (batch.ids[0] != 0).sum() == 4  # counting non-zero ids would say 4 real tokens, not 5
    assert batch.attention_mask[0, :6].tolist() == [True] * 5 + [False]
    assert batch.attention_mask.sum(1).tolist() == [5, 4]
    assert torch.equal(batch.ids.gather(1, batch.eot_index[:, None]).squeeze(1), torch.tensor([EOT, EOT]))


def test_eot_index_where_argmax_fails(tok):
    texts = ["!" * 40, "a cat", " ".join(["word"] * 200)]
    batch = tok.encode(texts)
    assert batch.ids[0, :5].tolist() == [SOT, 30146, 30146, 21622, EOT]  # "!"s merge into long pieces
    assert batch.eot_index.tolist() == [4, 3, 76]
    assert (batch.ids.gather(1, batch.eot_index[:, None]) == EOT).all()
    # Once <mask> or <sep> (ids above eot) enter a row, argmax no longer finds the end of text.
    masked = batch.ids.clone()
    masked[:, 1] = MASK
    assert (masked.argmax(-1) == 1).all() and (masked.gather(1, batch.eot_index[:, None]) == EOT).all()
    pairs = tok.encode_pair(["a cat", "a dog"], ["on a mat", "in a park"])
    assert pairs.ids.argmax(-1).tolist() == [3, 3]  # the sep
    assert pairs.eot_index.tolist() == [7, 7]
    assert (pairs.ids.gather(1, pairs.eot_index[:, None]) == EOT).all()


def test_word_start_marks_first_piece_of_each_word(tok):
    plain = tok.encode(["a photograph of unbelievable things"])
    assert plain.lengths.item() == 7  # "unbelievable" is one BPE token
    assert plain.word_start[0, :8].tolist() == [False, True, True, True, True, True, False, False]
    batch = tok.encode(["a photograph of indescribably strange things"])
    pieces = [tok._bpe.decoder[i] for i in batch.ids[0, 1: batch.eot_index[0]].tolist()]
    assert pieces == ["a</w>", "photograph</w>", "of</w>", "inde", "scri", "bab", "ly</w>", "strange</w>", "things</w>"]
    expected = [False, True, True, True, True, False, False, False, True, True, False]  # sot ... eot
    assert batch.word_start[0, :11].tolist() == expected
    assert not batch.word_start[0, 11:].any()  # padding
    # The first piece after <sep> starts a word too.
    pair = tok.encode_pair(["a cat"], ["zebrafish"])  # zebra fish</w>
    assert pair.word_start[0, :7].tolist() == [False, True, True, False, True, False, False]


def test_pair_layout_and_segments(tok):
    batch = tok.encode_pair(["a cat"], ["on a mat"])
    a, b = tok.bpe_ids("a cat"), tok.bpe_ids("on a mat")
    assert batch.ids[0, :8].tolist() == [SOT, *a, SEP, *b, EOT]
    assert batch.segment_ids[0, :10].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert batch.lengths.tolist() == [8] and batch.eot_index.tolist() == [7]


def test_pair_truncation_cuts_longer_side_first(tok):
    long_a = " ".join(["cat"] * 100)
    long_b = " ".join(["dog"] * 100)
    batch = tok.encode_pair([long_a, "a red car", long_a], ["a blue bus", long_b, long_b])
    assert (batch.lengths == 77).all()
    n_first = (batch.segment_ids == 0).logical_and(batch.attention_mask).sum(1) - 2  # minus sot, sep
    n_second = batch.segment_ids.sum(1) - 1  # minus eot
    assert n_first.tolist() == [74 - 3, 3, 37] and n_second.tolist() == [3, 74 - 3, 37]
    assert (batch.ids[:, 76] == EOT).all()
    assert batch.ids[2, 1 + 37].item() == SEP


def test_truncate_pair_matches_bert_loop():
    def bert(la, lb, budget):  # google-research/bert truncate_seq_pair, on lengths
        while la + lb > budget:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb

    for budget in (5, 6, 74):
        for la in range(0, 90):
            for lb in range(0, 90):
                assert truncate_pair(la, lb, budget) == bert(la, lb, budget)


def test_decode_round_trip(tok):
    texts = ["A photo of a cat, sitting on a mat!", "Café 東京 🚀", "!\"$ x"]
    batch = tok.encode(texts)
    decoded = [tok.decode(row) for row in batch.ids]
    assert decoded[0] == "a photo of a cat , sitting on a mat !"
    assert torch.equal(tok.encode(decoded).ids, batch.ids)
    masked = batch.ids[0].clone()
    masked[2] = MASK
    assert tok.decode(masked) == "a <mask> of a cat , sitting on a mat !"
    # Without a length, decoding stops at eot: the padding ids 0 ("!") are not text.
    assert tok.decode(batch.ids[2]) == '!"$ x'
    assert tok.decode(batch.ids[2], length=3) == '!"'


def test_pickles_for_spawned_workers(tok):
    clone = pickle.loads(pickle.dumps(Tokenizer(context_length=20)))
    assert clone.context_length == 20
    assert torch.equal(clone.encode(CAPTIONS).ids, Tokenizer(context_length=20).encode(CAPTIONS).ids)


def test_rejects_bad_input(tok):
    with pytest.raises(TypeError):
        tok.encode("a single string")
    with pytest.raises(ValueError, match="as many"):
        tok.encode_pair(["a"], [])
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=4)
