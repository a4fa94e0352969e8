"""Loaders: equal batches per rank, distinct samples, determinism, exact resume, bad data."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import TOKENIZER, make_loader, write_shards

from mmpretrain.data import loader as loader_mod
from mmpretrain.data.loader import TextBranch, image_text_loader, text_loader
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.transforms import image_transforms
from mmpretrain.errors import UserError
from mmpretrain.shards.reader import ShardError
from mmpretrain.shards.resolve import ShardSource


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


UNEVEN = [1, 13, 2, 30, 5]  # 51 samples, fewer shards than 2 ranks x 3 workers


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_equal_batches_distinct_samples(tmp_path, drop_last):
    pattern = write_shards(tmp_path, UNEVEN)
    per_rank = []
    for rank in range(2):
        loader = make_loader(pattern, batch_size=4, rank=rank, world=2, workers=3, drop_last=drop_last)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    seen = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert len(seen) == len(set(seen))  # no sample on two ranks
    if drop_last:
        assert all(len(b.keys) == 4 for r in per_rank for b in r)
        assert len(seen) == 51 // 8 * 8
    else:
        assert sorted(seen) == [f"{i:09d}" for i in range(51)]  # every sample exactly once


def test_batches_carry_what_training_and_eval_need(tmp_path):
    pattern = write_shards(tmp_path, [10])
    batch = next(iter(make_loader(pattern, workers=0, text_branch=TextBranch())))
    assert batch.images.shape == (4, 3, 8, 8) and batch.images.dtype == torch.float32
    assert batch.tokens.shape == (4, 16)
    for row, eot, key, label, digest in zip(batch.tokens, batch.eot_index, batch.keys,
                                            batch.labels, batch.image_hashes):
        assert row[eot] == TOKENIZER.eot_id
        assert label == int(key) % 3 and digest == f"h{int(key)}"
    text = batch.text  # the text branch from captions when no text shards are configured
    assert text.mlm_input_ids.shape == text.mlm_labels.shape == (4, 16)
    masked = text.mlm_labels != -100
    assert masked.any(dim=1).all()
    assert (text.ar_labels[:, :-1][text.ar_labels[:, :-1] != -100] ==
            batch.tokens[:, 1:][text.ar_labels[:, :-1] != -100]).all()


def test_same_config_same_batches(tmp_path):
    pattern = write_shards(tmp_path, UNEVEN)
    runs = [list(make_loader(pattern, workers=2, text_branch=TextBranch())) for _ in range(2)]
    assert keys_of(runs[0]) == keys_of(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images)  # augmentation replays
        assert torch.equal(a.text.mlm_input_ids, b.text.mlm_input_ids)  # masking replays
    other = make_loader(pattern, workers=2)
    other.set_epoch(1)
    assert keys_of(list(other)) != keys_of(runs[0])  # a new epoch, a new order


@pytest.mark.parametrize("workers, stop_after", [(0, 3), (2, 5), (3, 1)])
def test_resume_mid_epoch_continues_the_identical_stream(tmp_path, monkeypatch, workers, stop_after):
    pattern = write_shards(tmp_path, UNEVEN, drop={7: ("txt",)})
    full = list(make_loader(pattern, workers=workers, text_branch=TextBranch()))

    first = make_loader(pattern, workers=workers, text_branch=TextBranch())
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores

    decoded = []
    original = loader_mod.ImageTextDecoder.decode
    monkeypatch.setattr(loader_mod.ImageTextDecoder, "decode",
                        lambda self, s, c: decoded.append(s["__key__"]) or original(self, s, c))
    resumed = make_loader(pattern, workers=0 if workers == 0 else workers, text_branch=TextBranch())
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert keys_of(rest) == keys_of(full[stop_after:])
    for a, b in zip(rest, full[stop_after:]):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.text.mlm_labels, b.text.mlm_labels)
    if workers == 0:  # the resumed run decoded only what it delivered: skipping did not decode
        assert sorted(decoded) == sorted(keys_of(rest))


def test_resampled_mode_weights_and_epochs(tmp_path):
    a = write_shards(tmp_path / "a", [20, 20], name="a")
    b = write_shards(tmp_path / "b", [20, 20], name="b", first=1000)
    cfg = StreamConfig(shards=(ShardSource(a, 3.0), ShardSource(b, 1.0)), batch_size=8, mode="resampled",
                       seed=1, samples_per_epoch=4000)
    loader = image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=False),
                               num_workers=2)
    assert len(loader) == 500
    keys = keys_of(list(loader))
    assert len(keys) == 4000 and loader.state_dict()["epoch"] == 0
    share_a = sum(int(k) < 1000 for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.1  # 200 shard draws: 3 standard deviations
    next(iter(loader))
    assert loader.state_dict()["epoch"] == 1


def test_unusable_samples_are_skipped_counted_and_batches_stay_equal(tmp_path):
    drop = {3: ("txt",), 4: ("png",), 5: ("txt", "png")}
    pattern = write_shards(tmp_path, [6, 6], drop=drop)
    loader = make_loader(pattern, batch_size=4, workers=0, drop_last=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert loader.skipped["missing_caption"] == 1 and loader.skipped["missing_image"] == 2  # 5 lacks both
    keys = keys_of(batches)
    assert len(keys) == 12 and not {"000000003", "000000004", "000000005"} & set(keys)
    # the three missing slots are refilled from the worker's own earlier samples, and say so
    assert len(set(keys)) == 9 and loader.skipped["refilled"] == 3


def test_no_captions_fails_fast_with_the_shard_named(tmp_path):
    pattern = write_shards(tmp_path, [50, 50], drop={i: ("txt",) for i in range(100)})
    started = time.time()
    with pytest.raises(UserError, match=r"s-000000\.tar.*missing_caption 50"):
        make_loader(pattern)
    assert time.time() - started < 5


def test_bad_patterns_and_shards_are_named(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        make_loader(str(tmp_path / "none-*.tar"))
    pattern = write_shards(tmp_path, [10, 10])
    with pytest.raises(UserError, match=r"s-000002\.tar.*does not exist"):
        make_loader(pattern.replace("000001}", "000002}"))
    broken = tmp_path / "s-000001.tar"
    broken.write_bytes(broken.read_bytes()[:3000])  # cut mid-member
    loader = make_loader(pattern, workers=0, drop_last=False, shuffle=False)
    with pytest.raises(ShardError, match=r"s-000001\.tar"):
        list(loader)


def test_text_only_loader(tmp_path):
    pattern = write_shards(tmp_path, [9, 4], text_only=True)
    cfg = StreamConfig(shards=(ShardSource(pattern),), batch_size=3, seed=0)
    loader = text_loader(cfg, tokenizer=TOKENIZER, text_branch=TextBranch(pair_objective="sop"), num_workers=0)
    batches = list(loader)
    assert len(batches) == 4
    assert all(b.mlm_input_ids.shape == (3, 16) and b.pairs.labels.shape == (3,) for b in batches)
    texts = [t for b in batches for t in b.texts]
    assert len(set(texts)) == 12 and set(texts) <= {f"sample number {i}" for i in range(13)}


def test_pipe_urls_with_a_sizes_file(tmp_path):
    pattern = write_shards(tmp_path, [5, 6])
    cfg = StreamConfig(shards=(ShardSource(f"pipe:cat {pattern}", sizes=str(tmp_path / "sizes.json")),),
                       batch_size=2, seed=0, drop_last=False)
    loader = image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=False), num_workers=0)
    assert sorted(keys_of(list(loader))) == [f"{i:09d}" for i in range(11)]
    with pytest.raises(UserError, match="no known sample count"):
        make_loader(f"pipe:cat {pattern}")  # epoch mode cannot plan without counts


def test_evaluation_gives_every_rank_the_same_count_even_with_empty_last_batches(tmp_path):
    pattern = write_shards(tmp_path, [3])
    ranks = [list(make_loader(pattern, batch_size=1, rank=r, world=2, workers=0, drop_last=False)) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    assert sorted(keys_of(ranks[0] + ranks[1])) == ["000000000", "000000001", "000000002"]
    empty = ranks[1][-1]
    assert empty.keys == [] and empty.images.shape == (0, 3, 8, 8) and empty.tokens.shape == (0, 16)
