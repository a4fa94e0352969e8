"""`prepare --num-parts N --part I`: N processes (the tasks of a Slurm array) share one --out; the last
to finish, or `--finalize`, writes the dataset files. The result is byte-identical to one plain run,
also when --dedupe drops duplicates that lie in different parts and when finalize is killed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env
from test_prepare_pipeline import QUIET, counts, make_folder, tree_digest

from mmpretrain import storage
from mmpretrain.cli import main
from mmpretrain.prepare import finalize as finalize_module
from mmpretrain.prepare import pipeline

# 120 inputs in 12 blocks; the last 30 repeat the first 30 images, so with 3 parts (blocks b % 3)
# most duplicates lie in another part than their first copy.
ARGS = ["--shard-size", "10", "--val-fraction", "0.2", "--dedupe", "--name", "x", *QUIET]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    make_folder(root / "src", 120, duplicates=30)
    assert main(["prepare", str(root / "src"), "--out", str(root / "ref"), *ARGS]) == 0
    assert counts(root / "ref")["deduplicated"] == 30
    return root


def _prepare(src: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", str(src), "--out", str(out), *ARGS, *extra]


def test_concurrent_parts_equal_one_plain_run(reference, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "mmpretrain", *_prepare(reference / "src", out, "--num-parts", "3",
                                                                           "--part", str(i))],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0], results
    waiting = [err for _, err in results if "block(s) of other parts remain" in err]
    assert len(waiting) <= 2  # at least one part saw every block done and finalized
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
    assert not (out / ".prepare").exists() and not list(out.rglob("*.tmp"))


def test_parts_in_turn_then_finalize(reference, tmp_path, capsys):
    out = tmp_path / "out"
    for part in (2, 0):
        assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", str(part))) == 0
        assert "block(s) of other parts remain" in capsys.readouterr().err
    assert not (out / "dataset.json").exists() and not (out / "train" / "sizes.json").exists()

    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--finalize")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmpretrain prepare: error:") and "(parts 1)" in err, err

    other = _prepare(reference / "src", out, "--num-parts", "3", "--part", "1")
    other[other.index("--val-fraction") + 1] = "0.3"
    assert main(other) == 2  # a part of another command is refused, not mixed in
    assert "unfinished run with other sources or settings" in capsys.readouterr().err

    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", "1")) == 0  # the last part finalizes
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--finalize")) == 0  # done: nothing to do
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize("kill_at", ["dedupe_moves", "val_packing", "dataset_files"])
def test_finalize_killed_then_finalize_again(reference, tmp_path, monkeypatch, capsys, kill_at):
    """Finalize stopped part-way (while the rewritten shards of late duplicates are moved in, while
    val shards are packed, while the dataset files are written) leaves no dataset.json; --finalize
    then ends with the plain run's bytes."""
    out = tmp_path / "out"
    for part in (2, 1):  # before part 0: their copies of its images are written, for finalize to drop
        assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", str(part))) == 0

    calls = {"n": 0}

    def stop_on(target, after: int, when=lambda *args: True):
        def wrapper(*args, **kwargs):
            if when(*args):
                calls["n"] += 1
                if calls["n"] > after:
                    raise KeyboardInterrupt
            return target(*args, **kwargs)
        return wrapper

    if kill_at == "dedupe_moves":
        monkeypatch.setattr(storage, "move", stop_on(storage.move, 0))
    elif kill_at == "val_packing":  # after two blocks' val pieces are packed
        monkeypatch.setattr(finalize_module, "iter_tar_samples", stop_on(
            finalize_module.iter_tar_samples, 2, when=lambda url, *_: "/.prepare/val/" in str(url)))
    else:
        monkeypatch.setattr(finalize_module, "_concat_failures", stop_on(finalize_module._concat_failures, 0))
    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", "0")) == 130
    assert "interrupted; re-run the same command" in capsys.readouterr().err
    assert calls["n"] > 0
    assert not (out / "dataset.json").exists() and (out / ".prepare").exists()
    assert not (out / ".prepare" / "finalizing.json").exists()  # released: a rerun of any part may finalize
    monkeypatch.undo()

    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--finalize")) == 0
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
    assert not (out / ".prepare").exists() and not list(out.rglob("*.tmp"))


def test_a_part_that_finds_another_finalizing_leaves_it_alone(reference, tmp_path, capsys):
    """Parts that finish together all find every block done; only the one that creates
    .prepare/finalizing.json writes the dataset files. One that finds it taken (here: left by a
    finalizer killed with SIGKILL) says so and ends; --finalize then takes over."""
    out = tmp_path / "out"
    for part in (2, 1):
        assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", str(part))) == 0
    capsys.readouterr()
    claim = out / ".prepare" / "finalizing.json"
    claim.write_text(json.dumps({"part": 1, "pid": 0}))
    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", "0")) == 0
    err = capsys.readouterr().err
    assert "part 0 of 3 is done; another part is writing the dataset files" in err and str(claim) in err
    assert "--finalize" in err and claim.read_text() == json.dumps({"part": 1, "pid": 0})
    assert not (out / "dataset.json").exists() and not (out / "train" / "sizes.json").exists()
    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--finalize")) == 0
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
    assert not (out / ".prepare").exists()


@pytest.mark.parametrize("seen", ["work_area_gone", "nothing_missing"])
def test_a_part_that_ends_as_another_finalizes_returns_the_dataset(reference, tmp_path, monkeypatch, capsys, seen):
    """The last two parts end together; the other one finalizes (here: --finalize, run in between)
    while this one looks. It finds the work area gone, or (having looked just before) claims a
    finalize that then finds nothing to do: either way exit 0, the plain run's bytes, no work area."""
    out = tmp_path / "out"
    for part in (2, 1):
        assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", str(part))) == 0
    original = pipeline.missing_blocks

    def the_other_part_finalizes(url):
        monkeypatch.setattr(pipeline, "missing_blocks", original)
        assert main(_prepare(reference / "src", out, "--num-parts", "3", "--finalize")) == 0
        return original(url) if seen == "work_area_gone" else []

    monkeypatch.setattr(pipeline, "missing_blocks", the_other_part_finalizes)
    assert main(_prepare(reference / "src", out, "--num-parts", "3", "--part", "0")) == 0
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
    assert not (out / ".prepare").exists()


def test_finalize_without_parts_is_one_line(reference, tmp_path, capsys):
    assert main(_prepare(reference / "src", tmp_path / "empty", "--finalize")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no run to finalize" in err and str(tmp_path / "empty") in err


def test_slurm_array_recipe_runs_the_parts_and_finalizes(reference, tmp_path):
    """The recipe's own commands, with the variables Slurm sets for a 3-task array, run one task
    after another (sbatch is not here): the same dataset."""
    recipe = ROOT / "pipelines" / "recipes" / "prepare-slurm-array.sbatch"
    text = recipe.read_text()
    assert "#SBATCH --array" in text and "--num-parts" in text and "--part" in text
    out = tmp_path / "out"
    for task in range(3):
        env = {**subprocess_env(), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_ARRAY_TASK_MIN": "0", "SOURCES": str(reference / "src"), "OUT": str(out),
               "PREPARE_ARGS": " ".join(ARGS), "PYTHON": sys.executable}
        proc = subprocess.run(["bash", str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert tree_digest(out) == tree_digest(reference / "ref")
    assert counts(out) == counts(reference / "ref")
