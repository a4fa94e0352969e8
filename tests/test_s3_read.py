"""Shards in object storage, read side: `inspect`, `train` and `eval` on s3:// patterns against a real
S3-compatible server (moto, over HTTP; tests/s3server.py) give the numbers of the same shards read from
the local disk; sizes.json / dataset.json / stats.json beside them are found; a shard streams with
bounded memory; a cut connection is retried, and one that stays cut is a ShardError; a missing URL and
refused credentials are one line naming the URL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import CONFIG, ROOT, free_port, subprocess_env, tiny_checkpoint, train_overrides, write_shards
from s3server import SECRET_KEY, CountingProxy

from mmpretrain import storage
from mmpretrain.cli import main
from mmpretrain.config import load_config
from mmpretrain.shards.reader import UNREADABLE, ShardError, iter_tar_samples
from mmpretrain.shards.resolve import ShardSource, dataset_root, expand, resolve

CLASSES = ["zero", "one", "two"]  # write_shards labels sample n with n % 3


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    """The same dataset on disk and in a bucket: ds/{train,val} (+ sizes.json), dataset.json with class
    names and stats.json beside the splits, text shards in txt/. Sample 3 has no caption (a problem
    inspect reports, a sample training skips)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    local = tmp_path_factory.mktemp("s3data")
    write_shards(local / "ds" / "train", [13, 11], name="ds", drop={3: ("txt",)})
    write_shards(local / "ds" / "val", [6, 5], name="ds", first=100)
    (local / "ds" / "dataset.json").write_text(json.dumps({"name": "ds", "classes": CLASSES}))
    (local / "ds" / "stats.json").write_text(json.dumps({"reasons": {"http_404": 2, "decode": 1}}))
    write_shards(local / "txt", [9, 9], text_only=True)
    remote = s3.new_bucket()
    s3.upload(local, remote)
    return {"local": str(local), "remote": remote}


def _both(data, relative: str) -> tuple[str, str]:
    return f"{data['local']}/{relative}", f"{data['remote']}/{relative}"


def _as_remote(value, data):
    """`value` (from a run on the local copy) with the local root replaced by the bucket URL."""
    return json.loads(json.dumps(value).replace(data["local"], data["remote"]))


# -- resolve and inspect ---------------------------------------------------------------------------
def test_patterns_sizes_and_dataset_root_resolve_alike(data):
    for relative in ("ds/train", "ds/val/ds-{000000..000001}.tar", "ds/val/*.tar", "txt", "ds/train/ds-000001.tar"):
        local, remote = _both(data, relative)
        assert expand(remote) == _as_remote(expand(local), data), relative
        shards = resolve([ShardSource(remote)], need_sizes=True)  # sizes.json beside them, read from the bucket
        assert [[s.url, s.size] for s in shards] == _as_remote(
            [[s.url, s.size] for s in resolve([ShardSource(local)], need_sizes=True)], data)
    assert expand(f"{data['remote']}/ds", recursive=True) == [
        f"{data['remote']}/ds/{split}/ds-00000{i}.tar" for split in ("train", "val") for i in (0, 1)]
    for relative in ("ds", "ds/train", "ds/val/*.tar"):
        assert dataset_root(_both(data, relative)[1]) == f"{data['remote']}/ds"
    assert dataset_root(_both(data, "txt")[1]) is None  # no dataset files beside it


def _inspect(capsys, target: str) -> tuple[int, dict]:
    code = main(["inspect", target, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("relative", ["ds", "ds/train", "ds/val/ds-{000000..000001}.tar", "txt"])
def test_inspect_s3_gives_the_local_report(data, capsys, relative):
    local, remote = _both(data, relative)
    local_code, expected = _inspect(capsys, local)
    remote_code, report = _inspect(capsys, remote)
    assert (remote_code, report) == (local_code, _as_remote(expected, data))
    if relative == "ds":  # the numbers themselves, so that equality is not that of two empty reports
        assert {k: (v["shards"], v["samples"]) for k, v in report["splits"].items()} == {"train": (2, 24),
                                                                                       "val": (2, 11)}
        assert report["sizes_agree"] is True and report["failure_reasons"] == {"http_404": 2, "decode": 1}
        assert report["failures_from"] == f"{remote}/stats.json"
        assert report["problem_count"] == 1 and "000000003 has no caption" in report["problems"][0]
        assert report["problems"][0].startswith(f"{remote}/train/ds-000000.tar:")


# -- train ---------------------------------------------------------------------------------------
def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


def test_training_from_s3_gives_the_local_losses(data, tmp_path):
    """The s3 run is a subprocess (credentials and endpoint reach it through the environment, as on
    a cluster); the local one runs here with the subprocess's thread count."""
    from mmpretrain.train.trainer import Trainer

    extra = {"train.steps": 4, "train.checkpoint_every": 100}
    local = train_overrides(tmp_path / "local", *_both(data, "ds/train")[:1], _both(data, "txt")[0], **extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(ROOT / CONFIG, local)).fit()
    finally:
        torch.set_num_threads(threads)
    remote = train_overrides(tmp_path / "s3", _both(data, "ds/train")[1], _both(data, "txt")[1], **extra)
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.train", "--config", CONFIG, *remote], cwd=ROOT,
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _losses(tmp_path / "local" / "run"), _losses(tmp_path / "s3" / "run")
    assert sorted(got) == [1, 2, 3, 4] and len(set(expected.values())) == 4
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    for path in (tmp_path / "s3" / "run").rglob("*"):  # credentials come from the environment, never into files
        assert not path.is_file() or SECRET_KEY.encode() not in path.read_bytes(), path


# -- eval ----------------------------------------------------------------------------------------
def _eval(tmp_path: Path, task: str, checkpoint: Path, shards: str, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", task, "--checkpoint", str(checkpoint), "--shards", shards, "--out", str(out),
                 "--workers", "0", "--no-progress", "--batch-size", "4"]) == 0
    return json.loads(out.read_text())


def test_eval_on_s3_gives_the_local_metrics(data, tmp_path, capsys):
    _, _, ckpt = tiny_checkpoint(tmp_path / "run")
    local, remote = _both(data, "ds/val")
    for task in ("retrieval", "zeroshot"):
        expected, got = (_eval(tmp_path, task, ckpt, shards, f"{task}-{where}")
                         for where, shards in (("local", local), ("s3", remote)))
        assert got["metrics"] == expected["metrics"] and got["counts"] == expected["counts"], task
    assert got["counts"]["labelled"] == 11 and [c["class"] for c in got["metrics"]["per_class"]] == CLASSES
    assert got["settings"]["classnames"] == f"{data['remote']}/ds/dataset.json"  # found beside the s3 shards
    capsys.readouterr()


# -- errors ----------------------------------------------------------------------------------------
def _one_line(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "mmpretrain", *args], capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def test_missing_url_and_refused_credentials_are_one_line(s3, bucket, tmp_path):
    missing = f"{bucket}/nope/train"
    err = _one_line(["inspect", missing])
    assert err.startswith("mmpretrain inspect: error:") and missing in err, err
    _, _, ckpt = tiny_checkpoint(tmp_path / "run")
    err = _one_line(["eval", "retrieval", "--checkpoint", str(ckpt), "--shards", f"{bucket}/nope/s-{{0..1}}.tar"])
    assert f"shard {bucket}/nope/s-0.tar (and 1 more) from pattern" in err and "does not exist" in err, err

    write_shards(tmp_path / "train", [2])
    s3.upload(tmp_path / "train", f"{bucket}/ds/train")
    wrong = {**subprocess_env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret", "AWS_ACCESS_KEY_ID": "AKIAWRONG"}
    with s3.authentication():
        err = _one_line(["inspect", f"{bucket}/ds/train"], env=wrong)
    assert err.startswith("mmpretrain inspect: error:") and f"{bucket}/ds/train" in err and "access denied" in err
    assert "AWS_ACCESS_KEY_ID" in err and "not-the-secret" not in err, err  # says what to check, shows no secret


# -- streaming: bounded memory, retries --------------------------------------------------------------
def _big_shard(path: Path) -> list[dict]:
    """Three samples, the middle one with a member of 4 x READ_BLOCK: what each sample holds."""
    samples = [{"txt": b"first"}, {"txt": b"second", "bin": os.urandom(4 * storage.READ_BLOCK)}, {"txt": b"third"}]
    with tarfile.open(path, "w") as tar:
        for number, members in enumerate(samples):
            for ext, payload in sorted(members.items()):
                info = tarfile.TarInfo(f"{number:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return samples


def _members(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.startswith("__")} for s in samples]


def test_a_shard_streams_in_bounded_reads_and_a_cut_connection_is_retried(s3, bucket, tmp_path):
    import s3fs

    expected = _big_shard(tmp_path / "big.tar")
    url = f"{bucket}/big/big.tar"
    s3.upload(tmp_path, f"{bucket}/big")
    size = (tmp_path / "big.tar").stat().st_size
    saved = os.environ["AWS_ENDPOINT_URL"]
    with CountingProxy(s3.endpoint, free_port()) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert _members(iter_tar_samples(url, 0, 1)) == expected[:1]
            # One read-ahead block came over the wire for the first sample, not the 4-block shard.
            assert sum(proxy.sent) <= storage.READ_BLOCK + 2**16 and size > 4 * storage.READ_BLOCK, (proxy.sent, size)

            proxy.sent.clear()
            assert _members(iter_tar_samples(url)) == expected
            assert size <= sum(proxy.sent) < size + 2 * storage.READ_BLOCK  # sequential: each byte about once
            assert max(proxy.sent) <= storage.READ_BLOCK + 2**16  # in READ_BLOCK pieces

            proxy.cut_after, proxy.cut = 1, 1  # the second block's connection drops once: retried
            assert _members(iter_tar_samples(url)) == expected

            proxy.cut_after, proxy.cut = 1, -1  # ... and stays down: a ShardError after the first sample
            with pytest.raises(ShardError) as caught:
                list(iter_tar_samples(url))
            assert (caught.value.problem, caught.value.samples, caught.value.url) == (UNREADABLE, 1, url)
            assert str(caught.value).startswith(f"shard {url} is unreadable after 1 samples")
            assert "\n" not in str(caught.value)
            print("REASON", caught.value.reason, proxy.sent)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            s3fs.S3FileSystem.clear_instance_cache()


def test_many_small_objects_are_read_in_order_several_at_once(s3, bucket, tmp_path):
    """storage.read_many (finalize's pass over a run's block summaries): the objects' bytes in the
    order asked, one GET each, with up to READ_AT_ONCE requests in flight; a missing one is the
    one-line error naming it."""
    import s3fs

    for i in range(40):
        (tmp_path / f"{i:03d}.json").write_text(json.dumps({"block": i, "pad": "x" * i}))
    s3.upload(tmp_path, f"{bucket}/many")
    urls = [f"{bucket}/many/{i:03d}.json" for i in reversed(range(40))]
    saved = os.environ["AWS_ENDPOINT_URL"]
    with CountingProxy(s3.endpoint, free_port()) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            proxy.delay = 0.05
            assert [json.loads(b)["block"] for b in storage.read_many(urls, at_once=8)] == list(reversed(range(40)))
            assert [m for m, _ in proxy.requests] == ["GET"] * 40  # no HEAD before each GET
            assert 2 <= proxy.peak <= 8, proxy.peak
            with pytest.raises(storage.Missing) as caught:
                list(storage.read_many([urls[0], f"{bucket}/many/nothere.json"]))
            assert str(caught.value) == f"{bucket}/many/nothere.json does not exist; check the path"
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            s3fs.S3FileSystem.clear_instance_cache()
