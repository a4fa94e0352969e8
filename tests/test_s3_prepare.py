"""Shards in object storage, write side: `prepare --out s3://...` against a real S3-compatible server
(moto over HTTP, tests/s3server.py) writes the bytes a local run writes, shows no half-written or
temporary object, resumes after SIGKILL, runs as concurrent parts, and reads its sources (manifests
and their images, tar shards, text) from the bucket too. The prepared bucket is then inspected,
trained on and evaluated. Credentials reach every process through the environment only and appear
in no file or log."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from helpers import CONFIG, ROOT, subprocess_env, train_overrides, write_shards
from s3server import SECRET_KEY
from test_prepare_pipeline import QUIET, counts, make_folder, read_shards

from mmpretrain.cli import main

ARGS = ["--shard-size", "10", "--val-fraction", "0.2", "--name", "x", *QUIET]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below a local folder by its relative path, but stats.json (times, the command)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "stats.json"}


def _objects(s3, url: str) -> dict[str, bytes]:
    """Every object below a prefix by its key relative to it, but stats.json."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    client, found = s3.client(), {}
    for key in s3.keys(url):
        relative = key[len(prefix):].lstrip("/")
        if relative != "stats.json":
            found[relative] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return found


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mmpretrain", *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET_KEY not in proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A caption folder with two unreadable images (failures) and its plain local prepare."""
    root = tmp_path_factory.mktemp("s3prep")
    make_folder(root / "src", 48)
    for broken in ("part0/img0004.jpg", "part1/img0011.jpg"):
        (root / "src" / broken).write_bytes(b"not an image")
    assert main(["prepare", str(root / "src"), "--out", str(root / "ref"), *ARGS]) == 0
    assert counts(root / "ref")["failed"] == 2
    return root


def test_prepare_to_s3_then_inspect_train_eval(s3, bucket, source, tmp_path, capsys):
    out = f"{bucket}/ds"
    _run(["prepare", str(source / "src"), "--out", out, *ARGS])  # a subprocess: credentials from the environment
    objects = _objects(s3, out)
    assert objects == _tree(source / "ref")  # the same keys (no work area, no temp keys) and bytes
    assert any(k.startswith("val/") for k in objects) and "failures.jsonl" in objects
    assert SECRET_KEY.encode() not in b"".join(objects.values())
    stats = json.loads(s3.client().get_object(Bucket=bucket[5:], Key="ds/stats.json")["Body"].read())
    assert {k: stats[k] for k in ("splits", "inputs", "written", "failed")} == {
        k: v for k, v in counts(source / "ref").items() if k in ("splits", "inputs", "written", "failed")}
    assert SECRET_KEY not in json.dumps(stats)

    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(source / "ref"), "--json"]) == 0
    local = json.loads(capsys.readouterr().out.replace(str(source / "ref"), out))
    assert report == local and report["splits"]["train"]["samples"] == counts(source / "ref")["splits"]["train"]["written"]

    # train a few steps on the bucket's shards (image-text and, from the same shards' captions, text)
    from mmpretrain.config import load_config
    from mmpretrain.train.trainer import Trainer

    text = tmp_path / "txt"
    write_shards(text, [8], text_only=True)
    overrides = train_overrides(tmp_path, f"{out}/train", str(text), **{"train.steps": 3, "train.checkpoint_every": 3})
    Trainer(load_config(ROOT / CONFIG, overrides)).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert checkpoint.is_dir()

    results = {}
    for where, shards in (("s3", f"{out}/val"), ("local", str(source / "ref" / "val"))):
        target = tmp_path / f"eval-{where}.json"
        assert main(["eval", "retrieval", "--checkpoint", str(checkpoint), "--shards", shards, "--out", str(target),
                     "--workers", "0", "--no-progress", "--batch-size", "4"]) == 0
        results[where] = json.loads(target.read_text())
    assert results["s3"]["metrics"] == results["local"]["metrics"]
    assert results["s3"]["counts"]["samples"] == counts(source / "ref")["splits"]["val"]["written"]


def test_prepare_on_s3_resumes_after_sigkill(s3, bucket, tmp_path):
    make_folder(tmp_path / "src", 300)
    assert main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "ref"), *ARGS, "--workers", "1"]) == 0
    out = f"{bucket}/ds"
    cmd = [sys.executable, "-m", "mmpretrain", "prepare", str(tmp_path / "src"), "--out", out, *ARGS, "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not s3.keys(f"{out}/.prepare/blocks/") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    keys = s3.keys(out)
    assert not any(k.endswith("dataset.json") for k in keys)
    bucket_name = bucket[len("s3://"):]
    for key in keys:  # whatever the kill left visible is complete
        if key.endswith(".tar"):
            body = s3.client().get_object(Bucket=bucket_name, Key=key)["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                assert tar.getmembers()
    assert main(["prepare", str(tmp_path / "src"), "--out", out, *ARGS, "--workers", "1"]) == 0
    assert _objects(s3, out) == _tree(tmp_path / "ref")


def test_parts_on_s3_equal_one_plain_run(s3, bucket, source):
    out = f"{bucket}/ds"
    procs = [subprocess.Popen([sys.executable, "-m", "mmpretrain", "prepare", str(source / "src"), "--out", out, *ARGS,
                               "--num-parts", "2", "--part", str(i)],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    assert _objects(s3, out) == _tree(source / "ref")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_new_lets_one_of_many_racers_win(s3, bucket, tmp_path, where):
    """storage.create_new, what parts that finish together use to pick the one that finalizes: of
    8 threads racing for one name exactly one creates it, and its bytes are what is there."""
    import threading

    from mmpretrain import storage

    url = str(tmp_path / "work" / "claim.json") if where == "local" else f"{bucket}/work/claim.json"
    start, won = threading.Barrier(8), {}

    def race(i: int) -> None:
        start.wait()
        won[i] = storage.create_new(url, f"racer {i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, w in won.items() if w]
    assert len(won) == 8 and len(winners) == 1, won
    assert storage.read_bytes(url) == f"racer {winners[0]}".encode()
    assert storage.create_new(url, b"late") is False and storage.read_bytes(url) == f"racer {winners[0]}".encode()


def test_create_new_on_a_store_that_cannot_is_one_line():
    """A filesystem without create-if-absent (fsspec's read-only HTTP one refuses any write mode
    before it connects, so nothing is contacted here): a one-line UserError saying what to do, not
    a traceback."""
    from mmpretrain import storage
    from mmpretrain.errors import UserError

    url = "http://127.0.0.1:9/out/.prepare/finalizing.json"
    with pytest.raises(UserError) as caught:
        storage.create_new(url, b"claim")
    assert str(caught.value) == (f"{url}: this storage cannot create a file only if it is absent "
                                 "(NotImplementedError); let one process write the dataset files: run the parts, "
                                 "then --finalize")


def _write_manifest(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def _members(folder: Path) -> dict[str, dict[str, bytes]]:
    """The samples of a split, their .json without the "source" field (it names where each came from)."""
    samples = read_shards(folder)
    for sample in samples.values():
        if "json" not in sample:
            continue
        meta = json.loads(sample["json"])
        meta.pop("source")
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return samples


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_sources_in_the_bucket(s3, bucket, source, tmp_path, kind):
    """A manifest in the bucket names images beside it (relative keys) and one that is missing; tar
    shards and a text corpus in the bucket are sources too. Each gives the samples its local copy gives."""
    local = tmp_path / "local"
    images = [p for p in sorted((source / "src").rglob("*.jpg")) if p.read_bytes() != b"not an image"][:12]
    (local / "imgs").mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        (local / "imgs" / f"{i}.jpg").write_bytes(image.read_bytes())
        rows.append({"image": f"imgs/{i}.jpg", "caption": f"caption {i}"})
    rows.append({"image": "imgs/missing.jpg", "caption": "gone"})
    _write_manifest(local / f"list.{kind}", rows, kind)
    (local / "corpus").mkdir()
    (local / "corpus" / "a.txt").write_text("first line of text\nsecond line\n\nthird\n")
    (local / "corpus" / "b.jsonl").write_text(json.dumps({"text": "a json document"}) + "\n")
    s3.upload(local, f"{bucket}/in")
    s3.upload(source / "ref" / "train", f"{bucket}/in/shards")

    common = ["--val-fraction", "0", *QUIET]
    for name, src in (("manifest", f"list.{kind}"), ("shards", "shards")):
        assert main(["prepare", f"{bucket}/in/{src}", "--out", str(tmp_path / f"{name}-s3"), *common]) == 0
    assert main(["prepare", str(local / f"list.{kind}"), "--out", str(tmp_path / "manifest-local"), *common]) == 0
    assert main(["prepare", str(source / "ref" / "train"), "--out", str(tmp_path / "shards-local"), *common]) == 0
    for name in ("manifest", "shards"):
        got, expected = (_members(tmp_path / f"{name}-{where}" / "train") for where in ("s3", "local"))
        assert got == expected and len(got) == (12 if name == "manifest" else counts(source / "ref")["splits"]["train"]["written"])
    failures = [json.loads(line) for line in (tmp_path / "manifest-s3" / "failures.jsonl").read_text().splitlines()]
    assert [(f["reason"], f["source"]) for f in failures] == [("missing_file", f"{bucket}/in/imgs/missing.jpg")]
    assert failures[0]["detail"] == f"image file not found: {bucket}/in/imgs/missing.jpg"

    text_args = ["--text-only", "--val-fraction", "0", "--no-progress"]
    assert main(["prepare", f"{bucket}/in/corpus", "--out", str(tmp_path / "text-s3"), *text_args]) == 0
    assert main(["prepare", str(local / "corpus"), "--out", str(tmp_path / "text-local"), *text_args]) == 0
    got, expected = (_members(tmp_path / f"text-{where}" / "train") for where in ("s3", "local"))
    assert got == expected and sorted(s["txt"] for s in got.values()) == [
        b"a json document", b"first line of text", b"second line", b"third"]


def test_missing_s3_source_is_one_line(bucket, tmp_path, capsys):
    for missing in (f"{bucket}/nope/list.csv", f"{bucket}/nope/shards"):
        assert main(["prepare", missing, "--out", str(tmp_path / "out"), *QUIET]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("mmpretrain prepare: error:") and missing in err, err
    assert not (tmp_path / "out").exists()
