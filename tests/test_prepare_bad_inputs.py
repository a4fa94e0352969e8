"""`mmpretrain prepare` end to end on a collection salted with every kind of bad input: one run of
the real CLI over a folder source and a CSV manifest whose URLs a local HTTP server answers; the
test asserts the exit code, one failures.jsonl line per bad input with its reason and source, the
stats arithmetic, and what landed in the shards. User mistakes must end in exit code 2 and one line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import struct
import tarfile
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpretrain.cli import main

IMAGE_SIZE = 32
SLOW_S = 2.0  # the slow route answers after this long; the run's --timeout is 0.5
COMMON = ["--timeout", "0.5", "--retries", "0", "--workers", "2", "--no-progress", "--val-fraction", "0",
          "--image-size", str(IMAGE_SIZE), "--threads", "4"]


# -- inputs ------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo(size=(80, 60), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def odd_images() -> dict[str, bytes]:
    """Valid files in the less common encodings that real collections hold."""
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    palette.paste(1, (0, 0, 20, 30))
    y, x = np.mgrid[0:30, 0:40]
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = Image.new("RGB", (60, 40), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 15, 10))
    return {
        "odd_cmyk.jpg": encode(Image.new("CMYK", (40, 30), (255, 0, 0, 0)), "JPEG", quality=95),
        "odd_gray16.png": encode(Image.fromarray((x * 1600 + y).astype(np.uint16)), "PNG"),
        "odd_palette.png": encode(palette, "PNG", transparency=0),
        "odd_rotated.jpg": encode(rotated, "JPEG", quality=95, exif=exif.tobytes()),
    }


GOOD_JPEG = encode(photo(seed=1), "JPEG")
TRUNCATED_JPEG = encode(photo((200, 150), seed=2), "JPEG")[:-2000]


def build_folder(root: Path) -> None:
    root.mkdir()
    files = {
        "good_a.jpg": GOOD_JPEG,
        "good_b.png": encode(photo(seed=3), "PNG"),
        "bad_truncated.jpg": TRUNCATED_JPEG,
        "bad_empty.jpg": b"",
        "bad_text.jpg": b"this is a text file, not a JPEG\n" * 10,
        "bad_bomb.png": png_claiming(30000, 30000),
        "bad_nocaption.jpg": encode(photo(seed=4), "JPEG"),
        "bad_latin1.jpg": encode(photo(seed=5), "JPEG"),
        **odd_images(),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        stem = Path(name).stem
        if stem == "bad_latin1":
            (root / f"{stem}.txt").write_bytes("un caf\u00e9 cr\u00e8me".encode("latin-1"))
        elif stem != "bad_nocaption":
            (root / f"{stem}.txt").write_text(f"a caption for {stem}\n", encoding="utf-8")


def build_manifest(root: Path, base_url: str) -> Path:
    root.mkdir()
    (root / "local_ok.jpg").write_bytes(encode(photo(seed=6), "JPEG"))
    rows = [
        ("local_ok.jpg", "a local image"),
        ("missing.jpg", "a file that is not there"),
        (f"{base_url}/good.jpg", "an image over http"),
        (f"{base_url}/404.jpg", "a dead link"),
        (f"{base_url}/slow.jpg", "a server that never answers in time"),
        (f"{base_url}/loop/0", "a redirect loop"),
    ]
    path = root / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return path


# -- the server -------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (timeout)

    def reply(self, status: int, body: bytes = b"", content_type: str = "image/jpeg", location: str = ""):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/good.jpg":
            self.reply(200, GOOD_HTTP_JPEG)
        elif self.path == "/slow.jpg":
            self.server.stop.wait(SLOW_S)
            self.reply(200, GOOD_HTTP_JPEG)
        elif self.path.startswith("/loop/"):
            hop = int(self.path.rsplit("/", 1)[1])
            self.reply(302, b"", "text/plain", location=f"/loop/{hop + 1}")
        else:
            self.reply(404, b"<html>not found</html>", "text/html")


GOOD_HTTP_JPEG = encode(photo(seed=7), "JPEG")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.stop = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.stop.set()  # wake the slow handler
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# -- the end-to-end run -----------------------------------------------------------------------------
def read_shards(split_dir: Path) -> dict[str, dict]:
    """key -> {ext: bytes} over every tar of a split."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, server):
    """One run shared by the tests below (module scope, so capsys is replaced by redirection)."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    folder = tmp_path / "folder"
    build_folder(folder)
    manifest = build_manifest(tmp_path / "manifest", server)
    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["prepare", str(folder), str(manifest), "--out", str(out), "--resize-mode", "keep_ratio",
                     *COMMON])
    return {"code": code, "out": out, "folder": folder, "manifest": manifest, "url": server,
            "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_every_bad_input_is_one_failure_with_its_reason(prepared):
    assert prepared["code"] == 0, prepared["stderr"]
    folder, mdir, url = prepared["folder"], prepared["manifest"].parent, prepared["url"]
    expected = {
        "truncated_image": str(folder / "bad_truncated.jpg"),
        "empty_file": str(folder / "bad_empty.jpg"),
        "not_an_image": str(folder / "bad_text.jpg"),
        "decompression_bomb": str(folder / "bad_bomb.png"),
        "missing_caption": str(folder / "bad_nocaption.jpg"),
        "caption_not_utf8": str(folder / "bad_latin1.jpg"),
        "missing_file": str(mdir / "missing.jpg"),
        "http_404": f"{url}/404.jpg",
        "http_timeout": f"{url}/slow.jpg",
        "too_many_redirects": f"{url}/loop/0",
    }
    lines = (prepared["out"] / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(expected)
    assert {r["reason"]: r["source"] for r in records} == expected
    assert all(r["split"] == "train" and r["detail"] for r in records)


def test_stats_add_up_and_match_failures(prepared):
    out = prepared["out"]
    stats = json.loads((out / "stats.json").read_text())
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    for split in ("train", "val"):
        c = stats["splits"][split]
        assert c["inputs"] == c["written"] + c["failed"] + c["deduplicated"]
    assert stats["inputs"] == stats["written"] + stats["failed"] + stats["deduplicated"]
    # 12 folder images (6 bad, 6 good) + 6 manifest rows (4 bad, 2 good).
    assert (stats["inputs"], stats["written"], stats["failed"], stats["deduplicated"]) == (18, 8, 10, 0)
    assert stats["splits"]["val"]["inputs"] == 0
    assert stats["reasons"] == dict(Counter(r["reason"] for r in failures))
    assert "failures:" in prepared["stdout"] and "http_404 1" in prepared["stdout"]


def test_good_and_odd_inputs_are_in_the_shards(prepared):
    out, folder, mdir, url = prepared["out"], prepared["folder"], prepared["manifest"].parent, prepared["url"]
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    samples = read_shards(out / "train")
    assert sum(sizes.values()) == len(samples) == 8
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    good = ["good_a.jpg", "good_b.png", "odd_cmyk.jpg", "odd_gray16.png", "odd_palette.png", "odd_rotated.jpg"]
    assert set(by_source) == {str(folder / n) for n in good} | {str(mdir / "local_ok.jpg"), f"{url}/good.jpg"}
    decoded = {}
    for source, members in by_source.items():
        assert set(members) == {"jpg", "txt", "json"}
        img = Image.open(io.BytesIO(members["jpg"]))
        img.load()
        meta = json.loads(members["json"])
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (meta["width"], meta["height"]) and min(img.size) == IMAGE_SIZE
        assert members["txt"].decode() == meta["caption"]
        decoded[Path(source).name] = (np.asarray(img, dtype=np.int64), meta)
    assert decoded["good.jpg"][1]["caption"] == "an image over http"
    assert decoded["good_a.jpg"][1]["caption"] == "a caption for good_a"

    cmyk, _ = decoded["odd_cmyk.jpg"]
    assert np.abs(cmyk - (0, 255, 255)).max() <= 8
    gray, _ = decoded["odd_gray16.png"]
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 3  # JPEG chroma noise only
    assert gray.mean() > 20, "16-bit values were clipped or zeroed"
    palette, meta = decoded["odd_palette.png"]
    assert (meta["width"], meta["height"]) == (43, 32)
    assert np.abs(palette[:, :19] - (255, 0, 0)).max() <= 40  # opaque red on the left
    assert np.abs(palette[:, 24:] - 255).max() <= 10  # transparent -> white on the right
    rotated, meta = decoded["odd_rotated.jpg"]
    assert (meta["original_width"], meta["original_height"]) == (40, 60)
    assert (meta["width"], meta["height"]) == (32, 48)  # shown upright: portrait
    red_top_right = rotated[1:6, -6:-1]
    assert (red_top_right[..., 0] > 200).all() and (red_top_right[..., 2] < 80).all()


# -- user errors ------------------------------------------------------------------------------------
def assert_user_error(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err, err
    assert line.startswith("mmpretrain prepare: error: ")
    for needle in needles:
        assert needle in line
    return line


def test_missing_manifest_is_a_user_error(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert_user_error(capsys, ["prepare", str(missing), "--out", str(tmp_path / "out"), *COMMON], str(missing))


def test_manifest_without_the_caption_column_is_a_user_error(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(GOOD_JPEG)
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,caption\na.jpg,a cat\n", encoding="utf-8")
    assert_user_error(
        capsys, ["prepare", str(manifest), "--out", str(tmp_path / "out"), "--caption-column", "nope", *COMMON],
        "'nope'", "--caption-column", str(manifest),
    )
    assert not (tmp_path / "out").exists(), "a bad column must be caught before anything is written"


def test_output_inside_the_source_folder_is_a_user_error(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(GOOD_JPEG)
    (folder / "a.txt").write_text("a cat")
    assert_user_error(capsys, ["prepare", str(folder), "--out", str(folder / "shards"), *COMMON], "inside")
    assert not (folder / "shards").exists()


@pytest.mark.parametrize("contents", [{}, {"notes.md": b"no images here", "sub/readme.md": b"nor here"}])
def test_source_folder_without_images_is_a_user_error(tmp_path, capsys, contents):
    folder = tmp_path / "empty"
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert_user_error(
        capsys, ["prepare", str(folder), "--out", str(tmp_path / "out"), *COMMON], str(folder), "no inputs"
    )
    assert not (tmp_path / "out").exists()


# -- .tar sources: member sizes from the header, before anything is read ----------------------------------
def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_source_tar(path: Path, first: int, count: int, big: int | None = None, huge_after: bool = False) -> None:
    """`count` samples (jpg + txt) from key `first`; sample `big` has a 3 MB .jpg. With `huge_after`,
    the end-of-archive blocks give way to one header claiming 100 GB, and the file ends."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for n in range(first, first + count):
            add_member(tar, f"{n:09d}.jpg", b"\xff" * (3 * 2**20) if n == big else encode(photo(seed=n), "JPEG"))
            add_member(tar, f"{n:09d}.txt", f"tar caption {n}".encode())
    if huge_after:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        header = tarfile.TarInfo(f"{first + count:09d}.jpg")
        header.size = 100 * 2**30
        kept = path.read_bytes()[: last.offset_data + -(-last.size // 512) * 512]
        path.write_bytes(kept + header.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))


def test_tar_source_members_over_max_bytes_and_a_100_gb_header(tmp_path, capsys):
    src = tmp_path / "tars"
    src.mkdir()
    write_source_tar(src / "a.tar", 0, 4, big=1)  # a real 3 MB member under a 1 MB limit, then good samples
    write_source_tar(src / "b.tar", 10, 2, huge_after=True)  # cut inside a member that claims 100 GB
    write_source_tar(src / "c.tar", 20, 2)  # the run goes on with the next shard
    out = tmp_path / "out"
    code = main(["prepare", str(src), "--out", str(out), "--max-bytes", "1000000", *COMMON])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "MemoryError" not in err, err
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["source"]) for r in records] == [
        ("too_large", f"{src / 'a.tar'}#000000001"), ("corrupt_shard", str(src / "b.tar"))]
    assert "holds 3145728 bytes, over the limit of 1000000 bytes (--max-bytes)" in records[0]["detail"]
    assert "claims 107374182400 bytes" in records[1]["detail"] and "unreadable after 2 samples" in records[1]["detail"]
    captions = sorted(m["txt"].decode() for m in read_shards(out / "train").values())
    assert captions == sorted(f"tar caption {n}" for n in (0, 2, 3, 10, 11, 20, 21))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reasons"] == {"too_large": 1, "corrupt_shard": 1} and stats["written"] == 7


# -- folder sources: links that lead outside the folder ---------------------------------------------------
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def build_linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with a good sample, a caption linked outside, an image linked outside, a caption
    linked inside, a folder linked outside and a folder linked to itself (a loop)."""
    outside, folder = tmp_path / "elsewhere", tmp_path / "folder"
    (outside / "sub").mkdir(parents=True)
    (outside / "passwd").write_bytes(SECRET)
    (outside / "private.jpg").write_bytes(encode(photo(seed=11), "JPEG"))
    (outside / "sub" / "far.jpg").write_bytes(encode(photo(seed=12), "JPEG"))
    (outside / "sub" / "far.txt").write_text("a caption from outside the folder")
    folder.mkdir()
    (folder / "a.jpg").write_bytes(GOOD_JPEG)
    (folder / "a.txt").write_text("a caption for a")
    (folder / "c.jpg").write_bytes(encode(photo(seed=13), "JPEG"))
    (folder / "c.txt").symlink_to(outside / "passwd")
    (folder / "d.jpg").symlink_to(outside / "private.jpg")
    (folder / "d.txt").write_text("a caption for d")
    (folder / "e.jpg").write_bytes(encode(photo(seed=14), "JPEG"))
    (folder / "e.txt").symlink_to(folder / "a.txt")  # inside the folder: read as always
    (folder / "linked").symlink_to(outside / "sub", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return folder, outside


def test_links_out_of_a_folder_source_are_outside_source_failures(tmp_path, capsys):
    folder, outside = build_linked_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(folder), "--out", str(out), *COMMON]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["source"]) for r in records] == [
        ("outside_source", str(folder / "c.jpg")), ("outside_source", str(folder / "d.jpg"))]
    assert f"{folder / 'c.txt'} resolves to {outside / 'passwd'} through a link" in records[0]["detail"]
    assert f"{folder / 'd.jpg'} resolves to {outside / 'private.jpg'} through a link" in records[1]["detail"]
    assert all("--follow-symlinks" in r["detail"] for r in records)
    assert json.loads((out / "stats.json").read_text())["reasons"] == {"outside_source": 2}
    samples = read_shards(out / "train")
    assert sorted(m["txt"].decode() for m in samples.values()) == ["a caption for a", "a caption for a"]  # a, e
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert SECRET.strip() not in everything and b"outside the folder" not in everything


def test_follow_symlinks_reads_links_out_of_the_folder_once(tmp_path, capsys):
    folder, _ = build_linked_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(folder), "--out", str(out), "--follow-symlinks", *COMMON]) == 0, \
        capsys.readouterr().err
    assert not (out / "failures.jsonl").read_text()
    captions = sorted(m["txt"].decode() for m in read_shards(out / "train").values())
    # the loop back to the folder is walked zero times: each real folder once
    assert captions == sorted(["a caption for a", SECRET.decode().strip(), "a caption for d", "a caption for a",
                               "a caption from outside the folder"])


def test_class_folder_images_linked_outside_are_outside_source_failures(tmp_path, capsys):
    root, outside = tmp_path / "classes", tmp_path / "elsewhere"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (outside / "birds").mkdir(parents=True)
    (outside / "private.jpg").write_bytes(encode(photo(seed=21), "JPEG"))
    (outside / "birds" / "4.jpg").write_bytes(encode(photo(seed=24), "JPEG"))
    (root / "cat" / "1.jpg").write_bytes(encode(photo(seed=22), "JPEG"))
    (root / "dog" / "2.jpg").write_bytes(encode(photo(seed=23), "JPEG"))
    (root / "dog" / "3.jpg").symlink_to(outside / "private.jpg")
    (root / "bird").symlink_to(outside / "birds", target_is_directory=True)  # a whole class folder outside
    out = tmp_path / "out"
    assert main(["prepare", str(root), "--out", str(out), *COMMON]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["source"]) for r in records] == [("outside_source", str(root / "bird" / "4.jpg")),
                                                             ("outside_source", str(root / "dog" / "3.jpg"))]
    assert f"resolves to {outside / 'birds' / '4.jpg'} through a link" in records[0]["detail"]
    assert sorted(json.loads(m["json"])["source"] for m in read_shards(out / "train").values()) == [
        str(root / "cat" / "1.jpg"), str(root / "dog" / "2.jpg")]
    followed = tmp_path / "followed"
    assert main(["prepare", str(root), "--out", str(followed), "--follow-symlinks", *COMMON]) == 0
    assert len(read_shards(followed / "train")) == 4
