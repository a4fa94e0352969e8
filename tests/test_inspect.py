"""`inspect_shards` on tiny shards written here: counts, stats, every kind of broken input, the grid."""

import io
import json
import statistics
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.errors import UserError
from mmpretrain.shards.inspect import CAPTION_LINES, COLUMNS, LINE_HEIGHT, PAD, THUMB, inspect_shards


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], mode: str = "w") -> Path:
    """Write a webdataset tar: members KEY.EXT in sample order, fixed mtime so bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tf.addfile(info, io.BytesIO(data))
    return path


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 7 + seed * 40) % 256, (y * 5) % 256, (x * y + seed) % 256)
                for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample(key: str, w: int = 32, h: int = 24, caption: str = "a red cat", **extra) -> tuple:
    return key, {"jpg": jpeg(w, h, int(key) % 7), "txt": caption.encode(), **extra}


def make_prepare_layout(root: Path) -> dict[str, list[tuple[int, int]]]:
    """train: 2 shards (3 + 2 samples), val: 1 shard (2 samples). Returns sizes written per split."""
    dims = {"train": [[(32, 24), (40, 30), (64, 48)], [(20, 20), (50, 10)]], "val": [[(16, 32), (33, 17)]]}
    key = 0
    for split, shards in dims.items():
        sizes = {}
        for i, shard in enumerate(shards):
            name = f"demo-{i:06d}.tar"
            samples = []
            for w, h in shard:
                samples.append(sample(f"{key:09d}", w, h, f"caption number {key}", cls=str(key % 2).encode()))
                key += 1
            write_tar(root / split / name, samples)
            sizes[name] = len(shard)
        (root / split / "sizes.json").write_text(json.dumps(sizes))
    (root / "stats.json").write_text(json.dumps({"ok": 7, "failed": 3, "reasons": {"http_404": 2, "too_small": 1}}))
    (root / "failures.jsonl").write_text(
        "\n".join(json.dumps({"source": f"u{i}", "reason": r}) for i, r in enumerate(["http_404", "http_404", "too_small"])))
    (root / "dataset.json").write_text(json.dumps({"kind": "image_text"}))
    return {s: [d for shard in shards for d in shard] for s, shards in dims.items()}


def test_prepare_layout_counts_and_stats(tmp_path):
    dims = make_prepare_layout(tmp_path / "demo")
    report = inspect_shards(str(tmp_path / "demo"))
    assert report.problems == [] and report.problem_count == 0 and report.ok
    assert {k: (s.shards, s.samples) for k, s in report.splits.items()} == {"train": (2, 5), "val": (1, 2)}
    assert report.splits["train"].per_shard == {"min": 2, "mean": 2.5, "max": 3}
    ws = [w for d in dims.values() for w, _ in d]
    hs = [h for d in dims.values() for _, h in d]
    assert report.image_width == {"min": min(ws), "median": statistics.median(ws), "max": max(ws)}
    assert report.image_height == {"min": min(hs), "median": statistics.median(hs), "max": max(hs)}
    assert report.caption_words == {"min": 3, "median": 3, "max": 3}
    assert report.caption_chars == {"min": 16, "median": 16, "max": 16}  # "caption number 0".."6"
    assert report.failure_reasons == {"http_404": 2, "too_small": 1}
    assert report.labels == {"samples": 7, "distinct": 2}
    assert report.sizes_agree is True and not report.text_only
    text = report.to_text()
    assert "train" in text and "http_404: 2" in text and "problems: 0" in text
    assert json.loads(json.dumps(report.to_dict()))["splits"]["val"]["samples"] == 2


def test_failure_reasons_counted_from_jsonl_without_stats(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    (tmp_path / "demo" / "stats.json").unlink()
    assert inspect_shards(str(tmp_path / "demo")).failure_reasons == {"http_404": 2, "too_small": 1}


def test_img2dataset_layout(tmp_path):
    out = tmp_path / "laion"
    for shard in range(2):
        samples = [sample(f"{shard:05d}{i:04d}", 30 + i, 20, f"photo {i}", json=b'{"url": "x"}') for i in range(4)]
        write_tar(out / f"{shard:05d}.tar", samples)
        # img2dataset's own counts: what failed, by its error message
        status = {"success": 4, "<urlopen error [Errno 111] Connection refused>": 1 + shard}
        if shard == 1:
            status["image file is truncated"] = 2
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"successes": 4, "count": 5 + shard + 2 * shard, "status_dict": status}))
    (out / "00000.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    report = inspect_shards(str(out))
    assert report.problems == []
    assert list(report.splits) == ["all"]
    assert (report.splits["all"].shards, report.splits["all"].samples) == (2, 8)
    assert report.image_width == {"min": 30, "median": 31.5, "max": 33}
    assert report.sizes_agree is None
    assert report.failure_reasons == {"<urlopen error [Errno 111] Connection refused>": 3, "image file is truncated": 2}
    assert report.failures_from == "2 img2dataset *_stats.json files"
    text = report.to_text()
    assert "failures: 5 (<urlopen error [Errno 111] Connection refused>: 3, image file is truncated: 2) " \
           "[from 2 img2dataset *_stats.json files]" in text
    assert json.loads(json.dumps(report.to_dict()))["failure_reasons"]["image file is truncated"] == 2
    # only the inspected shards' files count
    assert inspect_shards(str(out / "00000.tar")).failure_reasons == {
        "<urlopen error [Errno 111] Connection refused>": 1}
    (out / "00001_stats.json").write_text(json.dumps({"successes": 4, "count": 4}))  # an older img2dataset
    assert sum(inspect_shards(str(out)).failure_reasons.values()) == 1


def test_brace_pattern_glob_and_single_tar(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    r = inspect_shards(str(tmp_path / "demo/train/demo-{000000..000001}.tar"))
    assert r.problems == [] and (r.splits["train"].shards, r.splits["train"].samples) == (2, 5)
    assert r.failure_reasons == {"http_404": 2, "too_small": 1}  # found beside the split folder
    r = inspect_shards(str(tmp_path / "demo/*/*.tar"))
    assert {k: s.samples for k, s in r.splits.items()} == {"train": 5, "val": 2} and r.problems == []
    r = inspect_shards(str(tmp_path / "demo/val/demo-000000.tar"))
    assert r.problems == [] and r.splits["val"].samples == 2 and r.sizes_agree is True


def test_split_folder_and_gzipped_tar(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    r = inspect_shards(str(tmp_path / "demo/train"))
    assert r.problems == [] and r.splits["train"].samples == 5 and r.sizes_agree is True
    assert r.failure_reasons == {"http_404": 2, "too_small": 1}
    gz = write_tar(tmp_path / "gz/shard.tar.gz", [sample("000000001"), sample("000000002")], mode="w:gz")
    r = inspect_shards(str(gz))
    assert r.problems == [] and r.splits["all"].samples == 2


def test_brace_pattern_naming_a_missing_shard(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    r = inspect_shards(str(tmp_path / "demo/train/demo-{000000..000002}.tar"))
    assert r.splits["train"].samples == 5
    assert r.problem_count == 1 and "demo-000002.tar" in r.problems[0]


def test_truncated_tar_is_named(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    shard = tmp_path / "demo/train/demo-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = inspect_shards(str(tmp_path / "demo"))
    assert any(p.startswith(f"{shard}: unreadable tar") for p in r.problems), r.problems
    assert r.splits["val"].samples == 2  # the other shards are still read


def test_tar_cut_at_member_boundary_is_named(tmp_path):
    key, members = sample("000000001")
    shard = write_tar(tmp_path / "x.tar", [(key, members)])
    jpg_end = 512 + -(-len(members["jpg"]) // 512) * 512  # header block + data padded to blocks
    shard.write_bytes(shard.read_bytes()[:jpg_end])  # tarfile reads this as a clean, shorter archive
    r = inspect_shards(str(shard))
    assert any(p.startswith(f"{shard}: unreadable tar after 0 samples") for p in r.problems), r.problems


def test_missing_caption_duplicate_key_and_bad_text(tmp_path):
    a = write_tar(tmp_path / "d/a.tar", [sample("000000001"), ("000000002", {"jpg": jpeg(8, 8)}),
                                         sample("000000003", caption="   ")])
    b = write_tar(tmp_path / "d/b.tar", [sample("000000001"), ("000000004", {"jpg": jpeg(8, 8), "txt": b"\xff\xfe"}),
                                         ("000000005", {"txt": b"no image here"})])
    r = inspect_shards(str(tmp_path / "d"))
    assert f"{a}: sample 000000002 has no caption (.txt)" in r.problems
    assert any(p.startswith(f"{a}: sample 000000003") and "empty caption" in p for p in r.problems)
    dup = [p for p in r.problems if "duplicate key" in p]
    assert len(dup) == 1 and str(a) in dup[0] and str(b) in dup[0] and "000000001" in dup[0]
    assert any(p.startswith(f"{b}: sample 000000004") and "UTF-8" in p for p in r.problems)
    assert any(p.startswith(f"{b}: sample 000000005 has no image") for p in r.problems)
    assert r.problem_count == 5


def test_problem_list_is_capped_but_counted(tmp_path):
    write_tar(tmp_path / "d/a.tar", [(f"{i:09d}", {"jpg": jpeg(4, 4)}) for i in range(60)])
    r = inspect_shards(str(tmp_path / "d"))
    assert r.problem_count == 60 and len(r.problems) == 50 and "and 10 more" in r.to_text()


def test_sizes_json_disagreeing(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    (tmp_path / "demo/train/sizes.json").write_text(json.dumps({"demo-000000.tar": 3, "demo-000001.tar": 9}))
    r = inspect_shards(str(tmp_path / "demo"))
    assert r.sizes_agree is False and r.problem_count == 1
    assert "sizes.json: demo-000001.tar lists 9 samples, the shard has 2" in r.problems[0]


def test_text_only_dataset(tmp_path):
    root = tmp_path / "text"
    captions = ["one", "two words", "three little words", "and now four words"]
    write_tar(root / "train/text-000000.tar", [(f"{i:09d}", {"txt": c.encode()}) for i, c in enumerate(captions)])
    (root / "train/sizes.json").write_text(json.dumps({"text-000000.tar": 4}))
    (root / "dataset.json").write_text(json.dumps({"kind": "text"}))
    r = inspect_shards(str(root))
    assert r.problems == [] and r.text_only and r.image_width is None
    assert r.caption_words == {"min": 1, "median": 2.5, "max": 4}
    assert r.caption_chars == {"min": 3, "median": 13.5, "max": 18}
    assert "text-only" in r.to_text()
    with pytest.raises(UserError, match="text-only"):
        inspect_shards(str(root), grid=tmp_path / "g.png")


def test_grid_contact_sheet(tmp_path):
    make_prepare_layout(tmp_path / "demo")
    out = tmp_path / "sheets" / "grid.png"
    r = inspect_shards(str(tmp_path / "demo"), grid=out, grid_samples=5)
    assert r.grid == str(out) and out.is_file()
    assert not list(out.parent.glob(".*tmp"))
    with Image.open(out) as im:
        cols, rows = 5, 1
        assert im.size == (PAD + cols * (THUMB + PAD), PAD + rows * (THUMB + CAPTION_LINES * LINE_HEIGHT + 2 * PAD))
        assert statistics.pvariance(im.convert("L").getdata()) > 0
    r = inspect_shards(str(tmp_path / "demo"), grid=out)  # all 7 samples, fewer than the 32 asked
    with Image.open(out) as im:
        assert im.width == PAD + min(COLUMNS, 7) * (THUMB + PAD)


def test_grid_wraps_to_rows(tmp_path):
    write_tar(tmp_path / "d/a.tar", [sample(f"{i:09d}", caption="word " * 40) for i in range(10)])
    out = tmp_path / "g.png"
    inspect_shards(str(tmp_path / "d"), grid=out, grid_samples=10)
    with Image.open(out) as im:
        assert im.size == (PAD + COLUMNS * (THUMB + PAD), PAD + 2 * (THUMB + CAPTION_LINES * LINE_HEIGHT + 2 * PAD))


@pytest.mark.parametrize("name", ["nope", "nope/*.tar", "nope-{000000..000003}.tar"])
def test_missing_path_is_a_user_error(tmp_path, name):
    target = str(tmp_path / name)
    with pytest.raises(UserError, match=r"no shards found") as e:
        inspect_shards(target)
    assert target in str(e.value) and "\n" not in str(e.value)


def test_directory_without_tars_is_a_user_error(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no .tar shards"):
        inspect_shards(str(tmp_path / "empty"))
