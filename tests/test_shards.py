"""The shard format owned once: the member/key rules, pattern resolution, and the one reader with
its integrity checks (cut at a member boundary, cut mid-member, fewer samples than sizes.json), as
the reader, the loaders, a training run and `inspect` report them."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers import free_port, make_loader, write_shards
from PIL import Image

from mmpretrain.errors import UserError
from mmpretrain.shards.format import split_member
from mmpretrain.shards.inspect import inspect_shards
from mmpretrain.shards.layout import find_root
from mmpretrain.shards.reader import (
    FEWER_SAMPLES,
    MISSING,
    NO_END_MARKER,
    TOO_LARGE,
    UNREADABLE,
    ShardError,
    count_samples,
    iter_tar_samples,
    too_large,
)
from mmpretrain.shards.resolve import ShardSource, dataset_root, expand, is_remote, resolve
from mmpretrain.train.runlog import RunLog

MEMBERS = 4  # write_shards: cls, json, png, txt per sample, in that order


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def cut_mid_member(path: Path, sample: int) -> None:
    """Cut inside the .png data of `sample`: samples before it stay whole."""
    png = _members(path)[sample * MEMBERS + 2]
    assert png.name.endswith(".png") and png.size > 2
    path.write_bytes(path.read_bytes()[: png.offset_data + png.size // 2])


def cut_at_boundary(path: Path, sample: int) -> None:
    """Cut right after the first member (.cls) of `sample`: a clean-looking end, no end-of-archive block."""
    cls = _members(path)[sample * MEMBERS]
    assert cls.name.endswith(".cls")
    path.write_bytes(path.read_bytes()[: cls.offset_data + -(-cls.size // 512) * 512])


def _keys(url: str, *args, **kw) -> tuple[list[str], ShardError | None]:
    """The keys the reader hands out before it stops, and the error it stops with."""
    keys = []
    try:
        for sample in iter_tar_samples(url, *args, **kw):
            keys.append(sample["__key__"])
    except ShardError as e:
        return keys, e
    return keys, None


@pytest.fixture
def shard(tmp_path) -> Path:
    write_shards(tmp_path, [8])
    return tmp_path / "s-000000.tar"


KEYS = [f"{i:09d}" for i in range(8)]


# -- the format ----------------------------------------------------------------------------------
def test_member_key_rule_is_webdatasets():
    from webdataset.tariterators import base_plus_ext

    names = ["000000001.jpg", "d/a.b.JPG", "/x/y.txt", "a.b/c", ".hidden", "a.", "x/y/z.tar.gz", "noext"]
    for name in names:
        ours = split_member(name)
        theirs = base_plus_ext(name)
        assert (ours is None) == (theirs[0] is None), name
        if ours is not None:
            assert ours == (theirs[0], theirs[1].lower()), name


# -- the reader ----------------------------------------------------------------------------------
def test_intact_shard_reads_whole_and_in_ranges(shard):
    assert _keys(str(shard)) == (KEYS, None)
    assert _keys(str(shard), 3, 6, size=8) == (KEYS[3:6], None)
    assert _keys(str(shard), 0, 64) == (KEYS, None)  # stop is a limit; only `size` is a promise
    assert _keys(f"pipe:cat {shard}", 5, size=8) == (KEYS[5:], None)
    assert count_samples(str(shard)) == 8
    first = next(iter_tar_samples(str(shard), 2))
    assert first["__index__"] == 2 and first["__url__"] == str(shard) and set(first) > {"png", "txt", "cls"}


@pytest.mark.parametrize("remote", [False, True])
def test_cut_at_a_member_boundary_is_reported(shard, remote):
    cut_at_boundary(shard, 6)
    url = f"pipe:cat {shard}" if remote else str(shard)
    keys, error = _keys(url)
    assert keys == KEYS[:6]  # sample 6 may lack members that were cut off: not handed out
    assert error.problem == NO_END_MARKER and error.samples == 6 and error.url == url
    assert str(shard) in str(error) and "end-of-archive" in str(error) and "re-create or delete" in str(error)
    assert isinstance(error, UserError)


def test_cut_at_a_member_boundary_inside_gzip_is_reported(shard):
    cut_at_boundary(shard, 3)
    gz = shard.with_suffix(".tar.gz")
    gz.write_bytes(gzip.compress(shard.read_bytes()))  # a complete gzip stream of a cut tar
    keys, error = _keys(str(gz))
    assert keys == KEYS[:3] and error.problem == NO_END_MARKER and error.samples == 3


@pytest.mark.parametrize("remote", [False, True])
def test_cut_mid_member_is_reported(shard, remote):
    cut_mid_member(shard, 5)
    url = f"pipe:cat {shard}" if remote else str(shard)
    keys, error = _keys(url)
    assert keys == KEYS[:5]
    assert error.problem == UNREADABLE and error.samples == 5 and str(shard) in str(error)
    # a break among the samples skipped before `start` (headers only, seeked over) is found too
    keys, error = _keys(url, 7)
    assert keys == [] and error.problem == UNREADABLE and error.samples == 5
    assert _keys(url, 0, 5) == (KEYS[:5], None)  # a range before the break reads clean


def test_fewer_samples_than_listed_is_reported(shard):
    keys, error = _keys(str(shard), 2, 10, size=10)
    assert keys == KEYS[2:]
    assert error.problem == FEWER_SAMPLES and error.samples == 8
    assert "holds 8 samples, 10 listed" in str(error) and "sizes.json" in str(error)
    assert _keys(str(shard), 0, 8, size=10)[1].problem == FEWER_SAMPLES  # it reached the end: short
    assert _keys(str(shard), 0, 5, size=10) == (KEYS[:5], None)  # it stopped before: no claim on the rest


def test_header_counts_refuse_a_defective_shard(shard):
    cut_at_boundary(shard, 4)
    with pytest.raises(ShardError, match=r"s-000000\.tar is cut short after 4 samples"):
        count_samples(str(shard))
    shard.write_bytes(b"")
    with pytest.raises(ShardError, match="unreadable after 0 samples"):
        count_samples(str(shard))


# -- member sizes: checked from the header before anything is read ---------------------------------
BIG = 3 * 2**20  # a real member over the 1 MiB limit below
LIMIT = 2**20
HUGE = 100 * 2**30  # what a broken header claims; the file ends right after it


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (n, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_sized(path: Path, samples: list[int], oversized: set[int] = frozenset(), huge_after: bool = False) -> None:
    """Samples (txt + png members) with the given numbers; those in `oversized` carry a 3 MB .png. With
    `huge_after`, the end-of-archive blocks are replaced by one header claiming 100 GB and the file ends."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for n in samples:
            _add(tar, f"{n:09d}.png", b"\x89" * BIG if n in oversized else _png(n))
            _add(tar, f"{n:09d}.txt", f"sample number {n}".encode())
    if huge_after:
        data = path.read_bytes()
        end = _members(path)[-1]
        header = tarfile.TarInfo(f"{samples[-1] + 1:09d}.png")
        header.size = HUGE
        tail = header.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        path.write_bytes(data[: end.offset_data + -(-end.size // 512) * 512] + tail)


@pytest.mark.parametrize("remote", [False, True])
def test_a_member_over_the_limit_is_skipped_unread_and_the_shard_goes_on(tmp_path, remote):
    path = tmp_path / "s-000000.tar"
    write_sized(path, [0, 1, 2, 3], oversized={1})
    url = f"pipe:cat {path}" if remote else str(path)
    samples = list(iter_tar_samples(url, max_member_bytes=LIMIT))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(4)]
    big = samples[1]
    assert set(big) == {"__key__", "__url__", "__index__", TOO_LARGE}  # none of its bytes is held
    assert too_large(big) == f"member 000000001.png holds {BIG} bytes, over the limit of {LIMIT} bytes"
    assert [s["txt"] for s in (samples[0], samples[2], samples[3])] == [b"sample number 0", b"sample number 2",
                                                                       b"sample number 3"]
    assert too_large(samples[2]) is None
    assert len(list(iter_tar_samples(url, max_member_bytes=None))[1]["png"]) == BIG  # no limit: read
    assert count_samples(str(path)) == 4


@pytest.mark.parametrize("remote", [False, True])
def test_a_header_claiming_100_gb_is_a_cut_shard_not_a_memory_error(tmp_path, remote):
    path = tmp_path / "s-000000.tar"
    write_sized(path, [0, 1, 2], huge_after=True)
    url = f"pipe:cat {path}" if remote else str(path)
    started = time.time()
    keys, error = _keys(url, max_member_bytes=None)  # even without a limit nothing is read whole
    assert keys == [f"{i:09d}" for i in range(3)]
    assert error.problem == UNREADABLE and error.samples == 3 and str(path) in str(error)
    if not remote:  # a plain local tar: the header is checked against the file's size
        assert f"member 000000003.png claims {HUGE} bytes, the file holds 0 after its header" in str(error)
    assert _keys(url, max_member_bytes=LIMIT)[1].problem == UNREADABLE  # a cut shard, not a skipped sample
    with pytest.raises(ShardError, match="unreadable after 3 samples"):
        count_samples(url)
    assert time.time() - started < 5  # tarfile alone skips a stream in 10 KiB reads: 6 s here


def test_a_shard_deleted_after_listing_is_named_as_gone(tmp_path):
    _, error = _keys(str(tmp_path / "gone.tar"))
    assert error.problem == MISSING and error.samples == 0
    assert str(error) == (f"shard {tmp_path / 'gone.tar'} is gone (No such file or directory); restore it, "
                          "or leave it out of the pattern and its sizes.json")


@pytest.mark.parametrize("workers", [0, 2])
def test_training_counts_oversized_and_huge_members_as_skips_naming_the_shard(tmp_path, workers):
    write_sized(tmp_path / "s-000000.tar", list(range(8)), oversized={2, 5})
    write_sized(tmp_path / "s-000001.tar", list(range(8, 12)), huge_after=True)
    write_sized(tmp_path / "s-000002.tar", list(range(12, 20)))
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 8, "s-000001.tar": 5, "s-000002.tar": 8}))
    loader = make_loader(str(tmp_path / "s-{000000..000002}.tar"), batch_size=3, workers=workers,
                         max_member_bytes=LIMIT)
    batches = list(loader)
    assert len(batches) == len(loader) == 7  # 21 listed samples
    keys = [k for b in batches for k in b.keys]
    usable = {f"{i:09d}" for i in range(20)} - {"000000002", "000000005"}
    assert set(keys) == usable  # every usable sample; repeats only where counted as refills
    assert len(keys) - len(set(keys)) == loader.skipped["refilled"] == 21 - 18  # 21 slots, 18 usable
    assert loader.skipped["too_large"] == 2
    defects = {d["shard"]: d for d in loader.take_defects()}
    assert set(defects) == {str(tmp_path / "s-000000.tar"), str(tmp_path / "s-000001.tar")}
    big = defects[str(tmp_path / "s-000000.tar")]
    assert (big["problem"], big["missing"]) == ("too_large", 2)
    assert str(tmp_path / "s-000000.tar") in big["message"] and "data.max_member_bytes" in big["message"]
    assert f"000000002: member 000000002.png holds {BIG} bytes" in big["message"]
    cut = defects[str(tmp_path / "s-000001.tar")]
    assert (cut["problem"], cut["missing"]) == (UNREADABLE, 1) and f"claims {HUGE} bytes" in cut["message"]


# -- pattern resolution --------------------------------------------------------------------------
def test_patterns_resolve_local_and_remote_in_one_function(tmp_path):
    write_shards(tmp_path / "d" / "train", [3, 4, 5])
    folder = tmp_path / "d" / "train"
    names = [str(folder / f"s-{i:06d}.tar") for i in range(3)]
    assert expand(str(folder)) == names  # a directory: every .tar in it
    assert expand(str(folder / "*.tar")) == names
    assert expand(str(folder / "s-{000000..000001}.tar")) == names[:2]
    assert expand(str(folder / "s-{000000..000003}.tar"))[-1].endswith("s-000003.tar")  # named, not checked here
    assert expand(str(tmp_path / "d"), recursive=True) == names
    assert expand("pipe:curl -s http://h/s-{0..2}.tar") == [f"pipe:curl -s http://h/s-{i}.tar" for i in range(3)]
    assert expand("https://h/a-{00..01}.tar") == ["https://h/a-00.tar", "https://h/a-01.tar"]
    assert all(is_remote(u) for u in ("pipe:cat x", "http://h/x.tar", "https://h/x", "gs://b/x", "s3://b/x"))
    assert not any(is_remote(u) for u in (str(folder), "shards/x.tar", "pipe"))

    shards = resolve([ShardSource(str(folder / "s-{000000..000002}.tar"))], need_sizes=True)
    assert [(s.url, s.size) for s in shards] == list(zip(names, [3, 4, 5]))
    (folder / "sizes.json").unlink()  # counted from the tar headers instead
    assert [s.size for s in resolve([ShardSource(str(folder))], need_sizes=True)] == [3, 4, 5]
    remote = resolve([ShardSource(f"pipe:cat {folder}/s-{{000000..000001}}.tar")], need_sizes=False)
    assert [s.size for s in remote] == [None, None]
    with pytest.raises(UserError, match="s-000003.tar.*does not exist"):
        resolve([ShardSource(str(folder / "s-{000000..000003}.tar"))], need_sizes=True)


def test_dataset_root_of_any_pattern(tmp_path):
    root = tmp_path / "NAME"
    write_shards(root / "val", [2, 2])
    assert find_root(root / "val") is None and dataset_root(str(root / "val")) is None
    (root / "dataset.json").write_text("{}")
    for pattern in ("val", "val/*.tar", "val/s-{000000..000001}.tar", "val/s-000001.tar"):
        assert dataset_root(str(root / pattern)) == str(root), pattern
    assert dataset_root(str(root)) == str(root)
    assert dataset_root(f"pipe:cat {root}/val/s-000000.tar") is None


# -- the loaders ---------------------------------------------------------------------------------
def write_defective(root: Path) -> tuple[str, dict[str, tuple[str, int]]]:
    """Four shards listed with 8 samples each: whole, cut mid-member (5 readable), cut at a member
    boundary (6), complete but holding 5. Returns the pattern and {shard: (problem, missing)}."""
    pattern = write_shards(root, [8, 8, 8, 5])
    cut_mid_member(root / "s-000001.tar", 5)
    cut_at_boundary(root / "s-000002.tar", 6)
    (root / "sizes.json").write_text(json.dumps({f"s-{i:06d}.tar": 8 for i in range(4)}))
    return pattern, {str(root / "s-000001.tar"): (UNREADABLE, 3), str(root / "s-000002.tar"): (NO_END_MARKER, 2),
                     str(root / "s-000003.tar"): (FEWER_SAMPLES, 3)}


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_reads_past_defective_shards_and_reports_them(tmp_path, workers):
    pattern, expected = write_defective(tmp_path)
    loader = make_loader(pattern, batch_size=4, workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # 32 listed samples in batches of 4
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 32 and len(set(keys)) == 8 + 5 + 6 + 5  # every readable sample once
    assert loader.skipped["refilled"] == 8 and sum(loader.skipped.values()) == 8
    defects = loader.take_defects()
    assert {d["shard"]: (d["problem"], d["missing"]) for d in defects} == expected
    assert len(defects) == 3 and all(d["epoch"] == 0 and d["shard"] in d["message"] for d in defects)
    assert loader.take_defects() == []  # handed out once


def test_resampled_training_reports_each_defective_shard_once_per_epoch(tmp_path):
    pattern, expected = write_defective(tmp_path)
    cfg_kw = {"mode": "resampled", "samples_per_epoch": 400}
    loader = make_loader(pattern, batch_size=4, workers=0, **cfg_kw)
    assert len(list(loader)) == 100  # 100 draws of 4 shards: each defective one drawn many times
    assert {d["shard"]: (d["problem"], d["missing"]) for d in loader.take_defects()} == expected
    cut_mid_member(tmp_path / "s-000000.tar", 0)
    for name in ("s-000001.tar", "s-000002.tar", "s-000003.tar"):
        (tmp_path / name).write_bytes((tmp_path / "s-000000.tar").read_bytes())
    with pytest.raises(UserError, match="no usable samples left.*defective shards met"):  # every shard empty: no hang
        list(make_loader(pattern, batch_size=4, workers=0, **cfg_kw))


@pytest.mark.parametrize("defect", ["mid_member", "boundary", "fewer"])
def test_evaluation_loader_stops_on_a_defective_shard(tmp_path, defect):
    write_defective(tmp_path)
    name = {"mid_member": "s-000001", "boundary": "s-000002", "fewer": "s-000003"}[defect]
    pattern = str(tmp_path / f"{{s-000000,{name}}}.tar")  # a whole shard and this defective one
    with pytest.raises(ShardError, match=rf"{name}\.tar"):
        list(make_loader(pattern, workers=0, drop_last=False, shuffle=False))


# -- a training run ------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/train/tiny.yaml"


def _train_args(shards: Path, run: Path, batch_size: int) -> list[str]:
    overrides = {
        "data.train_shards": str(shards), "data.text_shards": "[]", "data.mode": "epoch",
        "data.batch_size": batch_size, "data.num_workers": 1, "data.shuffle_buffer": 8, "train.steps": 8,
        "train.checkpoint_every": 8, "train.output_dir": str(run), "eval.every": 0, "logging.log_every": 1,
        "logging.trackers": "[]", "logging.progress": "false", "schedule.warmup_steps": 2,
    }
    return ["--config", str(CONFIG), *(f"{k}={v}" for k, v in overrides.items())]


def _check_run_log(log: list[str], run: Path, expected: dict) -> dict[int, dict]:
    """Each defective shard named in one warning line and one "data" line; returns the train lines."""
    for shard, (_, missing) in expected.items():
        lines = [line for line in log if Path(shard).name in line]
        assert len(lines) == 1 and lines[0].startswith("warning: step "), log
        assert f"Missing: {missing} samples" in lines[0] and "re-create" in lines[0]
    assert not any("s-000000.tar" in line for line in log)  # the whole shard is not named
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in rows if r["kind"] == "data"]
    assert {r["shard"]: (r["problem"], r["missing"]) for r in data} == expected and len(data) == 3
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 9)) and all(train[s]["skipped"] == 0 for s in train)
    return train


def test_training_run_over_defective_shards_logs_them_and_refills(tmp_path, capsys):
    from mmpretrain.cli import main

    _, expected = write_defective(tmp_path / "shards")
    assert main(["train", *_train_args(tmp_path / "shards", tmp_path / "run", batch_size=4)]) == 0
    train = _check_run_log(capsys.readouterr().err.splitlines(), tmp_path / "run", expected)
    # 24 readable of 32 listed samples: each of the 8 missing ones is refilled in its own slot, so the
    # running count grows where they fall in the global order and ends at 8
    refilled = [train[s]["refilled"] for s in range(1, 9)]
    assert refilled == sorted(refilled) and refilled[-1] == 8 and refilled[0] < 8


def test_run_log_writes_each_defect_once_per_shard_and_epoch(tmp_path, capsys):
    class MainProcess:
        is_main_process = True

    log = RunLog(MainProcess(), tmp_path, "p", {}, trackers=[])
    defect = {"epoch": 0, "shard": "/d/a.tar", "problem": NO_END_MARKER, "samples": 6, "missing": 2,
              "message": "shard /d/a.tar is cut short after 6 samples"}
    log.shard_defects(3, [defect, dict(defect)])  # two workers (or processes) met it
    remote = {**defect, "shard": "pipe:cat b.tar", "missing": None,
              "message": "shard pipe:cat b.tar is cut short after 6 samples"}
    log.shard_defects(5, [defect, remote])  # a shard without a listed size
    log.shard_defects(9, [{**defect, "epoch": 1}])  # a new epoch meets it again
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["epoch"], r["shard"], r["missing"]) for r in rows] == [
        ("data", 3, 0, "/d/a.tar", 2), ("data", 5, 0, "pipe:cat b.tar", None), ("data", 9, 1, "/d/a.tar", 2)]
    assert capsys.readouterr().err.splitlines() == [
        "warning: step 3, epoch 0: shard /d/a.tar is cut short after 6 samples. Missing: 2 samples; "
        "training goes on without them",
        "warning: step 5, epoch 0: shard pipe:cat b.tar is cut short after 6 samples. Missing: an unknown number "
        "of samples; training goes on without them",
        "warning: step 9, epoch 1: shard /d/a.tar is cut short after 6 samples. Missing: 2 samples; "
        "training goes on without them",
    ]


def test_two_processes_report_each_defect_once_and_sum_the_refills(tmp_path):
    _, expected = write_defective(tmp_path / "shards")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmpretrain.train",
           *_train_args(tmp_path / "shards", tmp_path / "run", batch_size=2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = _check_run_log(proc.stderr.splitlines(), tmp_path / "run", expected)
    refilled = [train[s]["refilled"] for s in range(1, 9)]
    assert refilled == sorted(refilled) and refilled[-1] == 8  # both ranks' slots, counted so far


# -- inspect -------------------------------------------------------------------------------------
def test_inspect_flags_every_defect_through_the_same_reader(tmp_path):
    write_defective(tmp_path / "NAME" / "train")
    report = inspect_shards(str(tmp_path / "NAME"))
    problems = report.problems
    folder = tmp_path / "NAME" / "train"
    assert any(p.startswith(f"{folder / 's-000001.tar'}: unreadable tar after 5 samples") for p in problems)
    assert any(p.startswith(f"{folder / 's-000002.tar'}: unreadable tar after 6 samples") for p in problems)
    assert f"{folder / 'sizes.json'}: s-000003.tar lists 8 samples, the shard has 5; re-run prepare or fix sizes.json" in problems
    assert report.sizes_agree is False and report.splits["train"].samples == 8 + 5 + 6 + 5
