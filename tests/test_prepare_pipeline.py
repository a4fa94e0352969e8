"""`mmpretrain prepare` end to end: source kinds, determinism, resume, splits, dedupe, interop."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpretrain.cli import main
from mmpretrain.prepare import engines
from mmpretrain.prepare.blocks import BlockWriter
from mmpretrain.shards.writer import ShardSequence

QUIET = ["--no-progress", "--image-size", "32"]


def _jpeg(rng: np.random.Generator, w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, n: int, seed: int = 0, duplicates: int = 0) -> list[bytes]:
    """n images with captions in two sub-folders; the last `duplicates` repeat earlier image bytes."""
    rng = np.random.default_rng(seed)
    images = [_jpeg(rng) for _ in range(n - duplicates)]
    images += [images[i] for i in range(duplicates)]
    for i, data in enumerate(images):
        sub = root / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:04d}.jpg").write_bytes(data)
        (sub / f"img{i:04d}.txt").write_text(f"caption   of image {i}\n")
    return images


def read_shards(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every shard and of the files whose bytes must not depend on how the run went."""
    files = [*sorted(out.glob("*/*.tar")), *sorted(out.glob("*/sizes.json")), out / "failures.jsonl",
             out / "dataset.json"]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def counts(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    return {k: stats[k] for k in ("splits", "inputs", "written", "failed", "deduplicated", "reasons")}


def test_folder_source_contract(tmp_path):
    make_folder(tmp_path / "src", 20)
    (tmp_path / "src" / "part0" / "img0000.cls").write_text("3")
    (tmp_path / "src" / "part0" / "img0000.json").write_text('{"photographer": "ana"}')
    (tmp_path / "src" / "part1" / "orphan.txt").write_text("a caption without an image")
    out = tmp_path / "shards" / "demo"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0", *QUIET]) == 0
    samples = read_shards(out / "train")
    assert len(samples) == 20
    assert all(k.isdigit() for k in samples)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["demo-000000.tar"]
    first = samples["000000000"]
    meta = json.loads(first["json"])
    assert first["txt"] == b"caption of image 0"  # white space normalised
    assert first["cls"] == b"3" and meta["label"] == 3 and meta["photographer"] == "ana"
    assert meta["sha256"] == hashlib.sha256(first["jpg"]).hexdigest()
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (32, 32, 48, 40)
    assert Image.open(io.BytesIO(first["jpg"])).size == (32, 32)
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"demo-000000.tar": 20}
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["reason"], Path(f["source"]).name) for f in failures] == [("missing_image", "orphan.txt")]
    assert counts(out)["inputs"] == 21 and counts(out)["written"] == 20


def test_class_folder_source(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("golden_retriever", "tabby_cat"):
        (tmp_path / "imnet" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imnet" / cls / f"{i}.jpg").write_bytes(_jpeg(rng))
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "imnet"), "--out", str(out), "--val-fraction", "0", *QUIET]) == 0
    samples = read_shards(out / "train")
    captions = sorted({s["txt"].decode() for s in samples.values()})
    assert captions == ["a photo of a golden retriever.", "a photo of a tabby cat."]
    assert {s["txt"].decode(): s["cls"] for s in samples.values()} == {
        "a photo of a golden retriever.": b"0", "a photo of a tabby cat.": b"1"}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["classes"] == ["golden_retriever", "tabby_cat"]
    assert dataset["sources"][0]["kind"] == "classes"


def _manifest_rows(tmp_path: Path, n: int) -> list[dict]:
    rng = np.random.default_rng(2)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(n):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpeg(rng))
        rows.append({"image": f"imgs/{i}.jpg", "caption": f"a, caption {i}", "label": i % 3, "photographer": f"p{i}"})
    return rows


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_sources(tmp_path, kind):
    rows = _manifest_rows(tmp_path, 6)
    path = tmp_path / f"manifest.{kind}"
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "out"
    os.chdir(tmp_path.parent)  # relative paths must resolve against the manifest's folder, not the cwd
    assert main(["prepare", str(path), "--out", str(out), "--val-fraction", "0", *QUIET]) == 0
    samples = read_shards(out / "train")
    assert len(samples) == 6
    for i, key in enumerate(sorted(samples)):
        meta = json.loads(samples[key]["json"])
        assert samples[key]["txt"].decode() == f"a, caption {i}"
        assert samples[key]["cls"] == str(i % 3).encode()
        assert meta["photographer"] == f"p{i}"  # extra columns travel in the .json


def test_missing_manifest_column_is_one_line_error(tmp_path, capsys):
    rows = _manifest_rows(tmp_path, 2)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["prepare", str(path), "--out", str(tmp_path / "o"), "--caption-column", "alt", *QUIET])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "m.jsonl" in err and "'alt'" in err and "Traceback" not in err


def test_worker_count_does_not_change_bytes(tmp_path):
    make_folder(tmp_path / "src", 60, duplicates=5)
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        args = ["prepare", str(tmp_path / "src"), "--out", str(out), "--workers", str(workers),
                "--shard-size", "7", "--val-fraction", "0.3", "--dedupe", "--name", "x", *QUIET]
        assert main(args) == 0
        digests.append(tree_digest(out))
    assert digests[0] == digests[1]
    assert len([k for k in digests[0] if k.endswith(".tar")]) >= 6


def test_split_by_content_hash_and_dedupe(tmp_path):
    make_folder(tmp_path / "src", 80, duplicates=20)
    out = tmp_path / "plain"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0.5", *QUIET]) == 0
    hashes = {s: [json.loads(x["json"])["sha256"] for x in read_shards(out / s).values()] for s in ("train", "val")}
    assert len(hashes["train"]) + len(hashes["val"]) == 80
    assert not set(hashes["train"]) & set(hashes["val"])  # a duplicate never sits on both sides
    assert len(hashes["val"]) > 10 and len(hashes["train"]) > 10

    deduped = tmp_path / "deduped"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(deduped), "--val-fraction", "0.5", "--dedupe", *QUIET]) == 0
    stats = counts(deduped)
    assert stats["deduplicated"] == 20 and stats["written"] == 60
    all_hashes = [json.loads(x["json"])["sha256"] for s in ("train", "val") for x in read_shards(deduped / s).values()]
    assert len(all_hashes) == len(set(all_hashes)) == 60
    for split in stats["splits"].values():
        assert split["inputs"] == split["written"] + split["failed"] + split["deduplicated"]


def test_shard_size_and_byte_limit(tmp_path):
    make_folder(tmp_path / "src", 30)
    out = tmp_path / "out"
    limit = 12 * 1024
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0",
                 "--shard-size", "8", "--max-shard-bytes", str(limit), *QUIET]) == 0
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 30 and max(sizes.values()) <= 8
    for name in sizes:  # the tar's end-of-archive blocks come on top of the member bytes
        assert (out / "train" / name).stat().st_size <= limit + 10240
    assert len(sizes) > 30 / 8 + 1  # the byte limit, not only the count, cut shards


def test_plain_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    make_folder(tmp_path / "src", 12)
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0", "--shard-size", "5", *QUIET]) == 0
    urls = sorted(str(p) for p in (out / "train").glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg;png;webp", "txt")
    pairs = list(ds)
    assert len(pairs) == 12
    assert all(img.size == (32, 32) and txt.startswith("caption of image") for img, txt in pairs)


def test_reshard_existing_webdataset(tmp_path):
    make_folder(tmp_path / "src", 10)
    first = tmp_path / "first"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(first), "--val-fraction", "0", "--shard-size", "3", *QUIET]) == 0
    second = tmp_path / "second"
    pattern = str(first / "train" / "first-{000000..000003}.tar")
    assert main(["prepare", pattern, "--out", str(second), "--val-fraction", "0", "--no-progress",
                 "--image-size", "16", "--shard-size", "100"]) == 0
    old, new = read_shards(first / "train"), read_shards(second / "train")
    assert len(new) == 10
    assert [s["txt"] for s in new.values()] == [s["txt"] for s in old.values()]
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (16, 16) for s in new.values())
    assert json.loads(new["000000000"]["json"])["source"] == str(tmp_path / "src/part0/img0000.jpg")


def test_text_only_shards(tmp_path):
    corpus = tmp_path / "corpus.txt"
    long_doc = " ".join(f"Sentence number {i} is here." for i in range(40))
    corpus.write_bytes(f"first document.\n\n{long_doc}\n".encode() + b"bad \xff bytes\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "from jsonl"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    out = tmp_path / "text"
    assert main(["prepare", str(corpus), str(jsonl), "--text-only", "--out", str(out), "--val-fraction", "0",
                 "--max-text-chars", "100", "--no-progress"]) == 0
    samples = read_shards(out / "train")
    texts = [s["txt"].decode() for s in samples.values()]
    assert all(set(s) == {"txt"} for s in samples.values())
    assert texts[0] == "first document." and texts[-1] == "from jsonl"
    assert all(len(t) <= 100 for t in texts)
    assert " ".join(texts[1:-1]) == long_doc  # split at sentence boundaries, nothing lost
    reasons = sorted(json.loads(x)["reason"] for x in (out / "failures.jsonl").read_text().splitlines())
    assert reasons == ["missing_text", "text_not_utf8"]
    assert json.loads((out / "dataset.json").read_text())["kind"] == "text"


def test_rerun_is_noop_and_other_settings_need_overwrite(tmp_path, capsys):
    make_folder(tmp_path / "src", 6)
    out = tmp_path / "out"
    base = ["prepare", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0", *QUIET]
    assert main(base) == 0
    before = tree_digest(out)
    assert main(base) == 0 and tree_digest(out) == before
    assert main([*base, "--image-size", "16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--image-size", "16", "--overwrite"]) == 0
    assert Image.open(io.BytesIO(read_shards(out / "train")["000000000"]["jpg"])).size == (16, 16)


class _Killed(Exception):
    """Stands for SIGKILL: raised mid-run, with the clean-up on error switched off."""


def test_a_block_closes_while_the_next_one_fills(tmp_path, monkeypatch):
    """A full block's shards are closed and its summary written on a thread of its own while the
    next block's results are written (a slow close, as on object storage, does not hold the workers
    up); blocks close one at a time, in order, and the bytes are those of an unhurried run."""
    make_folder(tmp_path / "src", 30)
    args = ["prepare", str(tmp_path / "src"), "--shard-size", "10", "--val-fraction", "0.2", "--name", "x", *QUIET]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    events = []
    finish, add = BlockWriter.finish, BlockWriter.add

    def slow_finish(self):
        events.append(("close", self.block, threading.current_thread() is threading.main_thread()))
        time.sleep(0.4 if self.block == 0 else 0.0)
        summary = finish(self)
        events.append(("closed", self.block))
        return summary

    monkeypatch.setattr(BlockWriter, "finish", slow_finish)
    monkeypatch.setattr(BlockWriter, "add", lambda self, result: (events.append(("add", self.block)), add(self, result)))
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    closes = [e for e in events if e[0] == "close"]
    assert closes == [("close", 0, False), ("close", 1, False), ("close", 2, True)]  # the last one: at the end
    assert events.index(("add", 1)) < events.index(("closed", 0))  # block 1 filled meanwhile
    assert events.index(("closed", 0)) < events.index(("close", 1, False))  # one close at a time
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "ref")


@pytest.mark.parametrize("kill_at", [3, 17, 40])
def test_resume_after_kill_is_identical(tmp_path, monkeypatch, kill_at):
    make_folder(tmp_path / "src", 50, duplicates=4)
    (tmp_path / "src" / "part0" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "src" / "part0" / "broken.txt").write_text("x")
    args = ["--val-fraction", "0.3", "--shard-size", "6", "--dedupe", "--name", "x", *QUIET]
    ref = tmp_path / "ref"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(ref), *args]) == 0

    out = tmp_path / "out"
    original = engines.LocalEngine._consume
    seen = {"n": 0}

    def dying_consume(self, result):
        seen["n"] += 1
        if seen["n"] == kill_at:
            raise _Killed
        original(self, result)

    monkeypatch.setattr(engines.LocalEngine, "_consume", dying_consume)
    monkeypatch.setattr(ShardSequence, "abandon", lambda self: None)  # a kill leaves temp files behind
    with pytest.raises(_Killed):
        main(["prepare", str(tmp_path / "src"), "--out", str(out), *args])
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(engines.LocalEngine, "_consume", original)
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), *args]) == 0
    assert tree_digest(out) == tree_digest(ref)
    assert counts(out) == counts(ref)
    assert not list(out.rglob("*.tmp")) and not (out / ".prepare").exists()


def test_sigkill_then_rerun_resumes(tmp_path):
    make_folder(tmp_path / "src", 400)
    args = ["prepare", str(tmp_path / "src"), "--val-fraction", "0.2", "--shard-size", "10", "--workers", "1",
            "--name", "x", *QUIET]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmpretrain.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = out / ".prepare" / "blocks"
    deadline = time.time() + 60
    while not _progressed(blocks) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()
    assert main([*args, "--out", str(out)]) == 0
    assert tree_digest(out) == tree_digest(ref)
    assert counts(out) == counts(ref)


def _progressed(blocks: Path) -> bool:
    """True once the run has finished a block (its summary is written last)."""
    try:
        return any(p.suffix == ".json" for p in blocks.iterdir())
    except OSError:
        return False


def test_tar_writer_bytes_equal_tarfile(tmp_path):
    from mmpretrain.shards.writer import TAR_MTIME, TarSampleWriter

    samples = [("000000001", {"jpg": b"x" * 1000, "txt": "café".encode(), "json": b"{}"}),
               ("000000002", {"txt": b""}), ("000000003", {"cls": b"7" * 512})]
    ours = io.BytesIO()
    writer = TarSampleWriter(ours)
    for key, members in samples:
        writer.write(key, members)
    writer.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), TAR_MTIME, 0o444
                tar.addfile(info, io.BytesIO(members[ext]))
    assert ours.getvalue() == reference.getvalue()


def test_format_that_contradicts_the_path_is_one_line_error(tmp_path, capsys):
    make_folder(tmp_path / "src", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\nsrc/part0/img0000.jpg,x\n")
    for source, fmt in ((tmp_path / "src", "csv"), (manifest, "folder"), (manifest, "parquet")):
        assert main(["prepare", str(source), "--format", fmt, "--out", str(tmp_path / "o"), *QUIET]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(source.name) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
