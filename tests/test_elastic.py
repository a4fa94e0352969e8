"""Elastic, deterministic streaming: a global batch is the same samples (and the same augmented
images and masks) whoever reads it, and a run resumes on another number of processes or workers
where it stood, with no sample skipped or repeated."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIG, ROOT, TOKENIZER, free_port, subprocess_env, train_overrides, write_shards

from mmpretrain.data.loader import TextBranch, image_text_loader, text_loader
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.transforms import image_transforms
from mmpretrain.errors import UserError
from mmpretrain.shards.resolve import ShardSource

UNEVEN = [1, 13, 2, 30, 5, 21]  # 72 samples: 6 global batches of 12, fewer shards than 3 ranks x 3 workers
GLOBAL = 12


def _loader(sources, *, rank, world, workers, mode="epoch", text=False):
    cfg = StreamConfig(shards=tuple(sources), batch_size=GLOBAL // world, seed=7, shuffle_buffer=16, mode=mode,
                       samples_per_epoch=72 if mode == "resampled" else None)
    if text:
        return text_loader(cfg, tokenizer=TOKENIZER, text_branch=TextBranch(pair_objective="sop"), rank=rank,
                           world=world, num_workers=workers)
    return image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=True), rank=rank,
                             world=world, num_workers=workers, text_branch=TextBranch())


def _views(batch, text: bool) -> list[tuple]:
    """Per sample: its key and what the model is given of it (augmented image or masked text)."""
    if text:
        return [(k, batch.mlm_input_ids[i].tolist(), int(batch.pairs.labels[i])) for i, k in enumerate(batch.keys)]
    return [(k, batch.images[i], batch.text.mlm_input_ids[i].tolist()) for i, k in enumerate(batch.keys)]


def _read_epoch(sources, world, workers, mode="epoch", text=False, epoch=0):
    """Per global batch: the samples of all ranks, in rank order (a rank reads the r-th slice of the
    global batch, so this is one order whatever the process count); asserts equal batch counts."""
    ranks = []
    for rank in range(world):
        loader = _loader(sources, rank=rank, world=world, workers=workers, mode=mode, text=text)
        loader.set_epoch(epoch)
        ranks.append(list(loader))
        assert len(ranks[-1]) == len(loader)
    batches = []
    for parts in zip(*ranks, strict=True):
        merged = []
        for part in parts:
            assert len(part.keys) == GLOBAL // world
            merged += _views(part, text)
        batches.append(merged)
    return batches


def _keys(batches) -> list[list[str]]:
    return [[sample[0] for sample in b] for b in batches]


def _assert_same(reference, got, text):
    assert _keys(got) == _keys(reference)  # the same samples, batch by batch, in the same order
    for a, b in zip(reference, got):
        for (key, x, y), (_, x2, y2) in zip(a, b):
            if text:
                assert (x, y) == (x2, y2), key
            else:
                assert torch.equal(x, x2) and y == y2, key  # the same augmentation and masks


@pytest.mark.parametrize("case", ["epoch", "resampled-weighted", "text"])
def test_one_epoch_is_the_same_global_batches_on_1_2_3_processes_and_1_to_3_workers(tmp_path, case):
    text = case == "text"
    if case == "resampled-weighted":
        mode = "resampled"
        sources = [ShardSource(write_shards(tmp_path / "a", [10, 20], name="a"), 2.0),
                   ShardSource(write_shards(tmp_path / "b", [15, 5], name="b", first=1000), 1.0)]
    else:
        mode = "epoch"
        sources = [ShardSource(write_shards(tmp_path / "s", UNEVEN, text_only=text))]
    reference = _read_epoch(sources, 1, 1, mode, text)
    assert len(reference) == 72 // GLOBAL
    keys = [k for b in _keys(reference) for k in b]
    if mode == "epoch":
        assert sorted(keys) == [f"{i:09d}" for i in range(72)]  # exactly the epoch, each sample once
    else:
        assert len(keys) == 72 and any(int(k) >= 1000 for k in keys) and any(int(k) < 1000 for k in keys)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            if (world, workers) != (1, 1):
                _assert_same(reference, _read_epoch(sources, world, workers, mode, text), text)
    assert _keys(_read_epoch(sources, 2, 2, mode, text, epoch=1)) != _keys(reference)  # a new epoch, a new order


@pytest.mark.parametrize("before, after", [((2, 1), (1, 3)), ((1, 1), (2, 2)), ((1, 1), (1, 3)), ((3, 2), (2, 1))])
def test_a_loader_resumes_on_another_shape_with_the_same_global_batches(tmp_path, before, after):
    """(processes, workers) before and after a stop after 2 global batches of epoch 1."""
    sources = [ShardSource(write_shards(tmp_path, UNEVEN))]
    reference = _read_epoch(sources, 1, 1, epoch=1)
    (world, workers), stop = before, 2
    states = []
    for rank in range(world):
        loader = _loader(sources, rank=rank, world=world, workers=workers)
        loader.set_epoch(1)
        it = iter(loader)
        for _ in range(stop):
            next(it)
        states.append(json.loads(json.dumps(loader.state_dict())))  # what a checkpoint stores
    assert all(s == states[0] for s in states) and states[0]["samples"] == stop * GLOBAL
    (world, workers), ranks = after, []
    for rank in range(world):
        loader = _loader(sources, rank=rank, world=world, workers=workers)
        assert loader.load_state_dict(states[0]) is None  # the same global batch: nothing to say
        ranks.append(list(loader))
    rest = [[v for part in parts for v in _views(part, False)] for parts in zip(*ranks, strict=True)]
    _assert_same(reference[stop:], rest, False)


def test_a_resume_with_another_global_batch_continues_the_sequence_and_says_so(tmp_path):
    sources = [ShardSource(write_shards(tmp_path, UNEVEN))]
    full = [k for b in _keys(_read_epoch(sources, 1, 1)) for k in b]
    first = _loader(sources, rank=0, world=2, workers=1)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "samples": 12, "global_batch": 12}
    cfg = StreamConfig(shards=tuple(sources), batch_size=8, seed=7, shuffle_buffer=16)
    ranks = [image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=True), rank=r,
                               world=3, num_workers=2) for r in range(3)]
    notes = {loader.load_state_dict(state) for loader in ranks}
    [note] = notes
    assert "global batches of 12" in note and "reads 24 (3 processes x 8)" in note and "sample 12 of epoch 0" in note
    rest = [k for parts in zip(*map(list, ranks), strict=True) for part in parts for k in part.keys]
    assert len(rest) == 48 and sorted(rest) == sorted(full[12:60])  # 60 = 12 + 2 batches of 24; 12 left over
    assert len(set(rest) | set(full[:12])) == 60  # nothing read twice across the resume


def test_a_position_past_the_epoch_of_these_shards_is_a_one_line_error(tmp_path):
    sources = [ShardSource(write_shards(tmp_path, UNEVEN))]
    loader = _loader(sources, rank=0, world=1, workers=0)
    with pytest.raises(UserError, match=r"sample 80 of epoch 2, but an epoch of these shards holds 72; resume "
                                         r"with the shards"):
        loader.load_state_dict({"epoch": 2, "samples": 80, "global_batch": 12})
    with pytest.raises(ValueError, match="position -1"):  # a damaged part: the checkpoint reader names it
        loader.load_state_dict({"epoch": 0, "samples": -1, "global_batch": 12})


# -- training: real `accelerate launch` processes ---------------------------------------------------
def _launch(processes: int, overrides: list[str]) -> list[str]:
    multi = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "mmpretrain.train", "--config", CONFIG, *overrides]


def _train(out: Path, images: str, text: str, processes: int, workers: int, resume: Path | None = None) -> Path:
    extra = {"data.batch_size": 16 // processes, "data.text_batch_size": 8 // processes, "data.num_workers": workers,
             "data.mode": "epoch", "data.shuffle_buffer": 16, "train.steps": 6, "train.checkpoint_every": 3,
             "logging.sample_keys": "true"}
    if resume is not None:
        extra["train.resume"] = str(resume)
    proc = subprocess.run(_launch(processes, train_overrides(out, images, text, **extra)), cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if resume is not None:
        assert "mmpretrain train: resume: " in proc.stdout
    return out / "run"


def _steps(run: Path) -> dict[int, dict]:
    """Per step: the loss and the sorted keys of the global batch (image-text and text) over all ranks."""
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    keys: dict[int, dict] = {}
    for part in sorted((run / "sample_keys").glob("rank-*.jsonl")):
        for line in map(json.loads, part.read_text().splitlines()):
            step = keys.setdefault(line["step"], {"image_text": [], "text": []})
            step["image_text"] += line["image_text"]
            step["text"] += line["text"]
    return {s: {"loss": losses[s], "image_text": sorted(k["image_text"]), "text": sorted(k["text"])}
            for s, k in keys.items()}


def test_training_resumes_on_another_number_of_processes_and_workers_with_the_same_losses(tmp_path):
    images = write_shards(tmp_path / "img", [13, 20, 7, 24])  # 64 samples: 4 global batches of 16 per epoch
    text = write_shards(tmp_path / "txt", [9, 15], text_only=True)  # 24 texts: 3 global batches of 8
    two = _steps(_train(tmp_path / "two", images, text, processes=2, workers=1))
    assert sorted(two) == list(range(1, 7))
    assert all(len(s["image_text"]) == len(set(s["image_text"])) == 16 and len(s["text"]) == 8 for s in two.values())
    epoch0 = [k for s in (1, 2, 3, 4) for k in two[s]["image_text"]]
    assert sorted(epoch0) == [f"{i:09d}" for i in range(64)]  # steps 1-4: the whole epoch, each sample once

    resumed = _steps(_train(tmp_path / "to-one", images, text, processes=1, workers=3,
                            resume=tmp_path / "two" / "run" / "checkpoints" / "step-00000003"))
    one = _steps(_train(tmp_path / "one", images, text, processes=1, workers=1))
    widened = _steps(_train(tmp_path / "to-two", images, text, processes=2, workers=2,
                            resume=tmp_path / "one" / "run" / "checkpoints" / "step-00000003"))
    for name, run, steps in (("1 x 16", one, range(1, 7)), ("2 -> 1", resumed, range(4, 7)),
                             ("1 -> 2", widened, range(4, 7))):
        assert sorted(run) == list(steps), name
        for s in steps:
            assert run[s]["image_text"] == two[s]["image_text"] and run[s]["text"] == two[s]["text"], (name, s)
            assert run[s]["loss"] == pytest.approx(two[s]["loss"], abs=1e-5, rel=0), (name, s)


def test_a_worker_opens_each_shard_once_per_epoch_and_reads_only_its_samples(tmp_path, monkeypatch):
    from mmpretrain.data import stream as stream_mod

    opened, taken = [], []
    original = stream_mod.iter_tar_samples

    def counting(url, start=0, stop=None, size=None, max_member_bytes=None, wanted=None):
        opened.append(url)
        for sample in original(url, start, stop, size, max_member_bytes, wanted):
            taken.append((url, sample["__index__"]))
            yield sample

    monkeypatch.setattr(stream_mod, "iter_tar_samples", counting)
    # 1280 samples in 40 shards: 16 regions of 80, each 2.5 shards; 5 read chunks of 256
    sizes = [32] * 40
    pattern = write_shards(tmp_path, sizes)
    cfg = StreamConfig(shards=(ShardSource(pattern),), batch_size=8, seed=7, shuffle_buffer=64)
    keys, touched = [], set()
    for rank in range(2):
        loader = image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=True), rank=rank,
                                   world=2, num_workers=0)
        opened.clear()
        keys += [k for b in loader for k in b.keys]
        # a shard once per region it holds (a shard of 32 lies in at most 2 regions of 80)
        assert max(collections.Counter(opened).values()) <= 2
        assert len(opened) <= len(set(opened)) + 15  # 15 region boundaries fall inside a shard
        assert len(set(opened)) < 40 * 0.75  # a rank reads about half the regions: a part of the shards
        touched |= set(opened)
    assert touched == {str(tmp_path / f"s-{i:06d}.tar") for i in range(40)}
    assert len(keys) == len(set(keys)) == 1280  # 80 global batches of 16
    assert len(taken) == len(set(taken)) == 1280  # no sample read twice, none read that is not used
