"""Training on bad shards ends in bounded time, one of two ways: a counted skip that names the shard
(the run goes on), or one clear line and exit code 2 (nothing to train on). Never a hang, never a
silent epoch of repeats: every sample seen twice in an epoch is a counted refill.

Each test runs under a deadline (SIGALRM in-process, `timeout` for the training CLI). Covered
elsewhere, with a real assertion and a timeout: a truncated shard over two processes
(test_shards.py::test_two_processes_report_each_defect_once_and_sum_the_refills); the loader API on
cut shards, shards with some samples unusable, and no captions at all (test_shards.py,
test_stream.py::test_no_captions_fails_fast_with_the_shard_named,
test_stream.py::test_unusable_samples_are_skipped_counted_and_batches_stay_equal).
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers import CONFIG, ROOT, make_loader, subprocess_env, train_overrides, write_shards

from mmpretrain.config import load_config
from mmpretrain.data.plan import epoch_sequence
from mmpretrain.data.stream import READ_CHUNK
from mmpretrain.errors import UserError
from mmpretrain.shards.reader import MISSING, UNREADABLE
from mmpretrain.shards.resolve import Shard

DEADLINE_S = 60  # in-process tests; a training command gets CLI_TIMEOUT_S
CLI_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def deadline():
    """A hang fails its test with a TimeoutError instead of stalling the suite."""
    def fire(signum, frame):
        raise TimeoutError(f"no result within {DEADLINE_S} s: the loader hangs")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def train(tmp_path: Path, shards: str, **extra) -> subprocess.CompletedProcess:
    """The real training command (epoch mode, 4 steps of 4 samples, one loader worker)."""
    settings = {"data.mode": "epoch", "train.steps": 4, "train.checkpoint_every": 4, **extra}
    cmd = [sys.executable, "-m", "mmpretrain", "train", "--config", CONFIG,
           *train_overrides(tmp_path, shards, "[]", **settings)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=subprocess_env())


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmpretrain train: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def assert_repeats_are_refills(keys: list[str], loader) -> None:
    """No silent repeats: each sample delivered twice in the epoch is one counted refill."""
    assert len(keys) - len(set(keys)) == loader.skipped["refilled"]


def empty_tar(path: Path) -> None:
    with tarfile.open(path, "w"):
        pass  # what webdataset's ShardWriter leaves when nothing is written


def set_sizes(root: Path, sizes: dict[str, int]) -> None:
    (root / "sizes.json").write_text(json.dumps(sizes))


# -- members missing .txt ----------------------------------------------------------------------------
def test_shards_without_captions_end_in_one_line_naming_the_shard(tmp_path):
    pattern = write_shards(tmp_path / "s", [8, 8], drop={i: ("txt",) for i in range(16)})
    started = time.time()
    proc = train(tmp_path, pattern)
    assert_one_line(proc, str(tmp_path / "s" / "s-000000.tar"), "missing_caption 8", "members present")
    assert time.time() - started < CLI_TIMEOUT_S / 2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_without_captions_among_good_ones_is_named_and_its_slots_counted(tmp_path, workers):
    pattern = write_shards(tmp_path, [8, 8, 8], drop={i: ("txt",) for i in range(8, 16)})
    loader = make_loader(pattern, batch_size=4, workers=workers)
    keys = keys_of(list(loader))
    assert len(keys) == 24 and set(keys) == {f"{i:09d}" for i in (*range(8), *range(16, 24))}
    assert loader.skipped["missing_caption"] == 8 and loader.skipped["refilled"] == 8
    assert_repeats_are_refills(keys, loader)
    defects = loader.take_defects()
    bad = str(tmp_path / "s-000001.tar")
    assert {d["shard"] for d in defects} == {bad}
    assert all(d["problem"] == "no_usable_samples" and "missing_caption" in d["message"] for d in defects)
    if workers == 0:  # one worker read the whole shard: the exact count
        assert [(d["missing"], d["samples"]) for d in defects] == [(8, 8)]
        assert defects[0]["message"].startswith(f"shard {bad}: none of the 8 samples read is usable")


# -- an empty tar ------------------------------------------------------------------------------------
def test_an_empty_first_shard_is_passed_over(tmp_path):
    write_shards(tmp_path, [8, 8], first=0)
    empty_tar(tmp_path / "a-empty.tar")
    set_sizes(tmp_path, {"a-empty.tar": 0, "s-000000.tar": 8, "s-000001.tar": 8})
    loader = make_loader(str(tmp_path / "*.tar"), batch_size=4, workers=0, shuffle=False)
    keys = keys_of(list(loader))
    assert keys == [f"{i:09d}" for i in range(16)]  # every sample once, nothing refilled, nothing to report
    assert loader.skipped["refilled"] == 0 and loader.take_defects() == []


@pytest.mark.parametrize("listed", [True, False])
def test_only_empty_tars_end_in_one_line(tmp_path, listed):
    empty_tar(tmp_path / "s-000000.tar")
    empty_tar(tmp_path / "s-000001.tar")
    if listed:
        set_sizes(tmp_path, {"s-000000.tar": 0, "s-000001.tar": 0})
    assert_one_line(train(tmp_path, str(tmp_path)), "none of the 2 shards holds a sample",
                    str(tmp_path / "s-000000.tar"))


# -- a file named .tar that is not a tar -------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"<html>403 Forbidden</html>\n" * 40], ids=["zero_bytes", "html"])
def test_a_non_tar_without_a_listed_size_ends_in_one_line(tmp_path, content):
    write_shards(tmp_path, [8])
    (tmp_path / "s-000001.tar").write_bytes(content)
    assert_one_line(train(tmp_path, str(tmp_path)), f"shard {tmp_path / 's-000001.tar'} is unreadable after 0 samples")


def test_a_listed_non_tar_among_good_shards_is_a_counted_skip(tmp_path):
    pattern = write_shards(tmp_path, [8, 8, 8])
    (tmp_path / "s-000001.tar").write_bytes(b"not a tar at all\n" * 100)
    loader = make_loader(pattern, batch_size=4, workers=2)
    keys = keys_of(list(loader))
    assert len(keys) == 24 and set(keys) == {f"{i:09d}" for i in (*range(8), *range(16, 24))}
    assert loader.skipped["refilled"] == 8
    assert_repeats_are_refills(keys, loader)
    [defect] = loader.take_defects()
    assert (defect["shard"], defect["problem"], defect["missing"]) == (str(tmp_path / "s-000001.tar"), UNREADABLE, 8)


def test_only_listed_non_tars_end_in_one_line_from_the_worker(tmp_path):
    """The error is raised in a DataLoader worker; its line reaches the terminal as it was, without the
    worker's traceback that DataLoader's own re-raise would put into it."""
    for name in ("s-000000.tar", "s-000001.tar"):
        (tmp_path / name).write_bytes(b"not a tar at all\n")
    set_sizes(tmp_path, {"s-000000.tar": 8, "s-000001.tar": 8})
    for mode, needle in (("resampled", "no usable samples left"), ("epoch", "no usable samples left")):
        proc = train(tmp_path / mode, str(tmp_path), **{"data.mode": mode, "data.samples_per_epoch": 16})
        assert_one_line(proc, needle, str(tmp_path / "s-000000.tar"), str(tmp_path / "s-000001.tar"))


# -- a pattern that matches nothing ------------------------------------------------------------------
def test_a_pattern_matching_nothing_ends_in_one_line(tmp_path):
    pattern = str(tmp_path / "nothing-*.tar")
    assert_one_line(train(tmp_path, pattern), f"shard pattern {pattern} matches no files")


# -- a shard deleted mid-run -------------------------------------------------------------------------
def test_a_shard_deleted_mid_epoch_is_counted_each_epoch_until_none_is_left(tmp_path):
    pattern = write_shards(tmp_path, [100, 100, 100, 100])
    loader = make_loader(pattern, batch_size=4, workers=0, shuffle=False)
    epoch = iter(loader)
    keys = keys_of([next(epoch)])  # the first READ_CHUNK samples are read; shard 3 is not yet
    assert READ_CHUNK < 300
    gone = tmp_path / "s-000003.tar"
    gone.unlink()
    keys += keys_of(list(epoch))
    assert len(keys) == 400 and set(keys) == {f"{i:09d}" for i in range(300)}
    assert loader.skipped["refilled"] == 100
    assert_repeats_are_refills(keys, loader)
    [defect] = loader.take_defects()
    assert (defect["epoch"], defect["shard"], defect["problem"], defect["missing"]) == (0, str(gone), MISSING, 100)
    assert "is gone" in defect["message"]

    before = loader.skipped["refilled"]
    keys = keys_of(list(loader))  # the next epoch proceeds without it, and says so again
    assert len(keys) == 400 and set(keys) == {f"{i:09d}" for i in range(300)}
    assert loader.skipped["refilled"] - before == 100
    assert [(d["epoch"], d["shard"]) for d in loader.take_defects()] == [(1, str(gone))]

    for path in tmp_path.glob("*.tar"):
        path.unlink()
    with pytest.raises(UserError, match="no usable samples left") as caught:
        list(loader)  # an epoch with no shard left: a clear error, not an epoch of nothing
    assert f"defective shards met: {tmp_path / 's-000000.tar'}, " in str(caught.value)
    assert "and 1 more" in str(caught.value)


def test_resampled_training_whose_shards_all_vanish_ends_in_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path, [8, 8, 8])
    loader = make_loader(pattern, batch_size=4, workers=1, mode="resampled", samples_per_epoch=4000)
    stream = iter(loader)
    next(stream)
    for path in tmp_path.glob("*.tar"):
        path.unlink()
    with pytest.raises(UserError) as caught:
        for _ in stream:  # draws with replacement would go on forever
            pass
    message = str(caught.value)
    assert "no usable samples left" in message and str(tmp_path / "s-000000.tar") in message
    assert "\n" not in message and "Traceback" not in message  # the worker's line, as it was


# -- a truncated shard and an oversized member, through the training command -------------------------
def test_a_cut_shard_and_an_oversized_member_are_warnings_naming_the_shard(tmp_path):
    root = tmp_path / "shards"
    write_shards(root, [8, 8])
    with tarfile.open(root / "s-000000.tar", "a") as tar:  # sample 16: a 3 MB image over a 1 MB limit
        for ext, data in (("png", b"\x89" * 3 * 2**20), ("txt", b"a caption")):
            info = tarfile.TarInfo(f"{16:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = root / "s-000001.tar"
    with tarfile.open(cut) as tar:
        png = [m for m in tar.getmembers() if m.name == f"{13:09d}.png"][0]
    cut.write_bytes(cut.read_bytes()[: png.offset_data + png.size // 2])  # samples 8-12 stay whole
    set_sizes(root, {"s-000000.tar": 9, "s-000001.tar": 8})
    proc = train(tmp_path, str(root), **{"data.max_member_bytes": 2**20})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, proc.stderr[-3000:]
    big = next(w for w in warnings if "s-000000.tar" in w)
    assert "000000016.png holds 3145728 bytes" in big and "data.max_member_bytes" in big
    assert "Missing: 1 samples" in big
    short = next(w for w in warnings if "s-000001.tar" in w)
    assert "unreadable after 5 samples" in short and "Missing: 3 samples" in short
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    data = {Path(r["shard"]).name: (r["problem"], r["missing"]) for r in rows if r["kind"] == "data"}
    assert data == {"s-000000.tar": ("too_large", 1), "s-000001.tar": (UNREADABLE, 3)}
    train_rows = [r for r in rows if r["kind"] == "train"]
    # 16 slots in 4 steps take 16 of the 17 listed samples; the unusable ones among them (the too-large
    # one: a counted skip, and the 3 past the cut) are refilled. Which one is left out: the global order.
    seq = epoch_sequence([Shard(str(root / "s-000000.tar"), 9, 0), Shard(str(cut), 8, 0)],
                         seed=load_config(ROOT / CONFIG, []).train.seed, epoch=0, mode="epoch", shuffle=True, window=8,
                         weights={0: 1.0}, total=17)
    entry, index = seq.locate(seq.unshuffled(16))
    left_out = (Path(seq.shards[entry].url).name, index)
    too_large = {("s-000000.tar", 8)}
    lost = {("s-000001.tar", i) for i in (5, 6, 7)}
    skipped, refilled = len(too_large - {left_out}), len((too_large | lost) - {left_out})
    assert len(train_rows) == 4 and train_rows[-1]["skipped"] == skipped and train_rows[-1]["refilled"] == refilled
