"""A full disk is one line naming the filesystem and the file, exit 2, nothing half-written, and the
same command (or train.resume=latest) continues once there is space.

The disks are real: a small tmpfs mounted in a private mount namespace (`unshare -rm`, no root on
the host needed where user namespaces are allowed), grown with `mount -o remount,size=` to "free space"."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIG, ROOT, subprocess_env, train_overrides, write_shards

from mmpretrain.fileio import DiskFull, is_disk_full, mount_point, writing

PYTHON = shlex.quote(sys.executable)
FULL_LINE = re.compile(r"^mmpretrain (\w+): error: no space left on (\S+) while writing (\S+); (.+)$")


def _namespaces_work() -> bool:
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm to mount a small tmpfs")


def _in_small_disk(disk: Path, size: str, script: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs `script` (sh) with a `size` tmpfs mounted on `disk`; the mount vanishes when it ends."""
    disk.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk} && {script}"],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=subprocess_env())


def _one_full_line(stderr: str, verb: str, disk: Path) -> re.Match:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    match = FULL_LINE.match(lines[0])
    assert match and match[1] == verb and match[2] == str(disk), lines[0]
    assert Path(match[3]).is_relative_to(disk), lines[0]
    return match


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tar"))}


# -- the pieces --------------------------------------------------------------------------------------
def test_writing_names_the_file_and_its_filesystem(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(DiskFull) as caught, writing(target):
        raise OSError(28, "No space left on device")
    assert str(caught.value) == (f"no space left on {mount_point(tmp_path)} while writing {target}; "
                                 "free space and rerun the same command to resume")
    # a library's own error type that carries the OS error number (safetensors' Rust writer)
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(DiskFull) as caught, writing(target, "do this"):
        raise RuntimeError("I/O error (os error 122)")  # EDQUOT
    assert str(caught.value).endswith("; do this")
    # a nested write keeps its file; an outer hint replaces what the user is told to do
    inner = tmp_path / "inner.json"
    with pytest.raises(DiskFull) as caught, writing(target, "rerun it"), writing(inner):
        raise OSError(28, "No space left on device")
    assert caught.value.path == inner and str(caught.value).endswith("; rerun it")
    with pytest.raises(PermissionError), writing(target):  # other errors pass untouched
        raise PermissionError(13, "Permission denied")


# -- prepare -----------------------------------------------------------------------------------------
@needs_tmpfs
def test_prepare_on_a_full_disk_is_one_line_and_the_rerun_resumes_identically(tmp_path):
    source = tmp_path / "src"
    subprocess.run([sys.executable, "-m", "mmpretrain", "demo-data", "--out", str(source), "--num-images", "40",
                    "--image-size", "96"], check=True, capture_output=True, timeout=120, env=subprocess_env())
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    prepare = (f"{PYTHON} -m mmpretrain prepare {source / 'folder'} --image-size 64 --shard-size 4 --no-progress "
               "--workers 1 --out")
    reference = subprocess.run([*shlex.split(prepare), str(tmp_path / "reference" / "ds")], capture_output=True,
                               text=True, timeout=300, env=subprocess_env())
    assert reference.returncode == 0, reference.stderr
    script = (f"{prepare} {disk}/ds 2>{tmp_path}/err1; echo $? >{tmp_path}/rc1; "
              f"find {disk}/ds -name '*.tmp' >{tmp_path}/temps; "
              f"mount -o remount,size=8m {disk} && {prepare} {disk}/ds 2>{tmp_path}/err2; echo $? >{tmp_path}/rc2; "
              f"cp -r {disk}/ds {copy}")
    done = _in_small_disk(disk, "96k", script, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rc1").read_text().strip() == "2"
    line = _one_full_line((tmp_path / "err1").read_text(), "prepare", disk)
    assert line[4] == "free space and rerun the same command to resume"
    assert (tmp_path / "temps").read_text() == ""  # nothing half-written was left behind
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert _digests(copy) == _digests(tmp_path / "reference" / "ds") and len(_digests(copy)) >= 3
    stats = json.loads((copy / "stats.json").read_text())
    assert stats["written"] == json.loads((tmp_path / "reference" / "ds" / "stats.json").read_text())["written"]


# -- train -------------------------------------------------------------------------------------------
def _losses(metrics: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if line["kind"] == "train"}  # the last word per step


@needs_tmpfs
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_as_latest(tmp_path):
    images, text = write_shards(tmp_path / "img", [13, 11]), write_shards(tmp_path / "txt", [9, 9], text_only=True)
    disk = tmp_path / "disk"
    steps = {"train.steps": 4, "train.checkpoint_every": 2}
    reference = subprocess.run(
        [sys.executable, "-m", "mmpretrain.train", "--config", CONFIG, *train_overrides(tmp_path / "ref", images,
                                                                                         text, **steps)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert reference.returncode == 0, reference.stderr
    train = shlex.join([sys.executable, "-m", "mmpretrain.train", "--config", CONFIG,
                        *train_overrides(disk, images, text, **steps)])
    # one checkpoint of the tiny model is ~40 MB: the first fits in 64 MB, the second does not
    script = (f"{train} 2>{tmp_path}/err1; echo $? >{tmp_path}/rc1; "
              f"ls -a {disk}/run/checkpoints >{tmp_path}/after; "
              f"mount -o remount,size=256m {disk} && {train} train.resume=latest 2>{tmp_path}/err2; "
              f"echo $? >{tmp_path}/rc2; cp {disk}/run/metrics.jsonl {tmp_path}/metrics.jsonl")
    done = _in_small_disk(disk, "64m", script, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rc1").read_text().strip() == "2", (tmp_path / "err1").read_text()
    line = _one_full_line((tmp_path / "err1").read_text(), "train", disk)
    assert "/checkpoints/.tmp-step-00000004/" in line[3]
    assert line[4] == "free space and rerun with train.resume=latest to continue from step-00000002 (kept as latest)"
    assert (tmp_path / "after").read_text().split() == [".", "..", "step-00000002"]  # the temp folder is gone
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert _losses(tmp_path / "metrics.jsonl") == _losses(tmp_path / "ref" / "run" / "metrics.jsonl")


# -- eval --------------------------------------------------------------------------------------------
@needs_tmpfs
def test_eval_output_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    images = write_shards(tmp_path / "img", [6])
    weights = tmp_path / "w.safetensors"
    subprocess.run([sys.executable, "-c", "import sys; from safetensors.torch import save_file; "
                    "from mmpretrain.models import build_model, load_model_config; "
                    "save_file(build_model(load_model_config('tiny')).export_state_dict(), sys.argv[1])",
                    str(weights)], check=True, timeout=300, env=subprocess_env())
    disk = tmp_path / "disk"
    evaluate = (f"{PYTHON} -m mmpretrain eval retrieval --checkpoint {weights} --model tiny --shards "
                f"{shlex.quote(images)} --workers 0 --no-progress")
    script = (f"head -c 60000 /dev/zero >{disk}/filler 2>/dev/null; "
              f"{evaluate} --out {disk}/report.json --report {disk}/report.png 2>{tmp_path}/err >/dev/null; "
              f"echo $? >{tmp_path}/rc; ls -a {disk} >{tmp_path}/after")
    done = _in_small_disk(disk, "64k", script, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rc").read_text().strip() == "2"
    line = _one_full_line((tmp_path / "err").read_text(), "eval", disk)
    assert line[4] == "free space and rerun the same command"
    assert (tmp_path / "after").read_text().split() == [".", "..", "filler"]
