"""The procedural demo data: deterministic, laid out as promised, and captions true to the pixels."""

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpretrain.errors import UserError
from mmpretrain.prepare import demo
from mmpretrain.prepare.demo import CLASSES, COLORS, generate_demo_data

HEADER = "image,caption,label,shape,color,count"
# English plurals written out here, not taken from the module, so a grammar bug cannot hide itself.
PLURAL = {c: c + ("es" if c.endswith("ss") else "s") for c in CLASSES}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _nouns_in(caption: str) -> set[str]:
    """Classes whose singular or plural noun occurs as a whole word."""
    return {c for c in CLASSES if re.search(rf"\b({c}|{PLURAL[c]})\b", caption)}


def _position_of(caption: str) -> str:
    """The grid cell a caption names: the longest matching phrase ("at the top left" beats "at the top")."""
    hits = [(len(phrase), name) for name, (_, _, phrases) in demo.POSITIONS.items()
            for phrase in phrases if re.search(rf"\b{phrase}\b", caption, re.IGNORECASE)]
    return max(hits)[1]


def _size_of(caption: str) -> str:
    words = {w: size for size, ws in demo.SIZE_WORDS.items() for w in ws}
    pattern = "|".join(sorted(words, key=len, reverse=True))  # "medium-sized" before "medium"
    return words[re.search(rf"\b({pattern})\b", caption).group(1)]


def _all_captions(root: Path) -> list[tuple[str, int]]:
    folder = [(p.read_text(encoding="utf-8"), int(p.with_suffix(".cls").read_text()))
              for p in sorted((root / "folder").rglob("*.txt"))]
    return folder + [(row["caption"], int(row["label"])) for row in _manifest(root)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_data(out, num_images=200, num_documents=50, seed=0)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_demo_data(tmp_path / name, num_images=40, num_documents=20, seed=seed)
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 20 * 3 + 20 + 3  # folder png/txt/cls, manifest pngs, manifest/corpus/classes
    assert a == b
    assert a.keys() == c.keys()
    changed = [name for name in a if a[name] != c[name]]
    assert "manifest.csv" in changed and "corpus.txt" in changed
    assert sum(name.endswith(".png") for name in changed) >= 35  # nearly every image is redrawn


def test_image_depends_on_seed_and_index_only(tmp_path):
    generate_demo_data(tmp_path / "short", num_images=10, num_documents=0, manifest_fraction=0.0)
    generate_demo_data(tmp_path / "long", num_images=30, num_documents=0, manifest_fraction=0.0)
    short, long = _hashes(tmp_path / "short" / "folder"), _hashes(tmp_path / "long" / "folder")
    assert short == {name: long[name] for name in short}


def test_layout_adds_up_and_every_file_opens(small):
    out, summary = small
    pngs = sorted((out / "folder").rglob("*.png"))
    rows = _manifest(out)
    assert (out / "manifest.csv").read_text(encoding="utf-8").splitlines()[0] == HEADER
    assert len(pngs) == summary["folder_images"] == 100
    assert len(rows) == summary["manifest_images"] == 100
    keys = [p.stem for p in pngs] + [Path(row["image"]).stem for row in rows]
    assert sorted(keys) == [f"{i:09d}" for i in range(200)]
    for png in pngs:
        assert png.parent.name == f"{int(png.stem) // 1000:05d}"
        assert png.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert 0 <= int(png.with_suffix(".cls").read_text()) < len(CLASSES)
    for path in pngs[:5] + [(out / "manifest.csv").parent / row["image"] for row in rows]:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
    assert not list(out.glob(".*.tmp"))
    assert (out / "classes.txt").read_text().splitlines() == CLASSES


def test_folder_is_split_into_subfolders_of_1000(tmp_path):
    summary = generate_demo_data(tmp_path, num_images=1001, image_size=16, num_documents=0,
                                 manifest_fraction=0.0)
    assert summary["folder_images"] == 1001 and summary["manifest_images"] == 0
    assert len(list((tmp_path / "folder" / "00000").glob("*.png"))) == 1000
    assert [p.name for p in (tmp_path / "folder" / "00001").glob("*.png")] == ["000001000.png"]
    assert (tmp_path / "manifest.csv").read_text(encoding="utf-8").strip() == HEADER


def test_manifest_captions_name_the_drawn_scene(small):
    out, _ = small
    for row in _manifest(out):
        caption, shape, color, count = row["caption"], row["shape"], row["color"], int(row["count"])
        assert int(row["label"]) == CLASSES.index(shape)
        counts = "|".join(demo.COUNT_WORDS[count])
        noun = shape if count == 1 else PLURAL[shape]
        assert re.search(rf"\b({counts}) \S+ {color} {noun}\b", caption, re.IGNORECASE), caption
        assert _nouns_in(caption) == {shape}, caption  # no other class, no wrong number
        if caption.startswith("There"):
            assert caption.startswith("There is" if count == 1 else "There are"), caption
        assert caption[0].isupper() and caption.endswith(".")


def test_folder_captions_name_their_label(small):
    out, _ = small
    for caption, label in _all_captions(out)[:100]:
        assert _nouns_in(caption) == {CLASSES[label]}, caption


def test_pixels_show_colour_position_and_size(small):
    out, _ = small
    areas: dict[tuple, dict[str, list[int]]] = {}
    for row in _manifest(out):
        pixels = np.asarray(Image.open(out / row["image"]))  # (H, W, 3)
        mask = np.all(pixels == COLORS[row["color"]], axis=-1)  # exact: PNG, no anti-aliasing
        assert mask.sum() >= 10 * int(row["count"]), row
        # The cell from the words themselves, not the module's table, so a wrong table cannot hide.
        words = _position_of(row["caption"]).split()
        col = 0 if "left" in words else 2 if "right" in words else 1
        line = 0 if "top" in words else 2 if "bottom" in words else 1
        ys, xs = np.nonzero(mask)
        # The group's centre lies inside its named third of the frame (a small margin for jitter).
        assert col / 3 - 0.05 < xs.mean() / 64 < (col + 1) / 3 + 0.05, row
        assert line / 3 - 0.05 < ys.mean() / 64 < (line + 1) / 3 + 0.05, row
        key = (row["shape"], row["count"])
        areas.setdefault(key, {}).setdefault(_size_of(row["caption"]), []).append(int(mask.sum()))
    compared = 0
    for by_size in areas.values():
        present = [by_size[s] for s in demo.SIZES if s in by_size]  # small, medium, large order
        for smaller, larger in zip(present, present[1:]):
            assert max(smaller) < min(larger), by_size
            compared += 1
    assert compared >= 10


def test_classes_are_distinguishable_at_the_smallest_drawn_size():
    smallest = demo.SIZES["small"] * demo.COUNT_SCALE[3] * 64  # about 3.5 px
    for r in (smallest, demo.SIZES["large"] * 64):
        masks = []
        for shape in CLASSES:
            img = Image.new("L", (64, 64), 0)
            demo._draw_shape(ImageDraw.Draw(img), shape, 32, 32, r, 255)
            masks.append(np.asarray(img) > 0)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
                assert iou < 0.85, (CLASSES[i], CLASSES[j], r, iou)


def test_default_size_has_variety_and_a_corpus(tmp_path):
    summary = generate_demo_data(tmp_path)  # the demo's defaults: 4000 images, 2000 documents
    captions = _all_captions(tmp_path)
    assert len(captions) == summary["images"] == 4000
    assert len({c for c, _ in captions}) == summary["distinct_captions"] >= 3000
    labels = np.bincount([label for _, label in captions], minlength=len(CLASSES))
    assert labels.min() > 0.8 * 4000 / len(CLASSES)
    assert {row["color"] for row in _manifest(tmp_path)} == set(COLORS)
    lines = (tmp_path / "corpus.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == summary["documents"] == 2000
    sentences = [len(re.findall(r"[.!?](?= |$)", line)) for line in lines[:-1]]
    assert min(sentences) >= 3 and max(sentences) == 12 and np.mean(sentences) > 6
    assert all(_nouns_in(line) for line in lines[:-1])


def test_rerun_replaces_old_outputs_and_refuses_foreign_folders(tmp_path):
    generate_demo_data(tmp_path, num_images=30, num_documents=5)
    summary = generate_demo_data(tmp_path, num_images=10, num_documents=5)
    assert len(list((tmp_path / "folder").rglob("*.png"))) + len(_manifest(tmp_path)) == 10
    assert len(list((tmp_path / "manifest_images").glob("*.png"))) == summary["manifest_images"] == 5
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="notes.md"):
        generate_demo_data(tmp_path, num_images=10)
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_binding_task_varies_shape_colour_and_position_only(tmp_path):
    """The quickstart's task: one large shape on plain white; captions and pixels say so, and every
    shape, colour and cell occurs, so the scenes are the 8 x 10 x 9 the summary counts."""
    summary = generate_demo_data(tmp_path, num_images=600, num_documents=40, task="binding")
    assert (summary["task"], summary["possible_scenes"]) == ("binding", 720)
    rows, cells = _manifest(tmp_path), set()
    for row in rows:
        caption = row["caption"]
        assert row["count"] == "1" and _size_of(caption) == "large", caption
        assert re.search(r"\bwhite background\b", caption), caption
        pixels = np.asarray(Image.open(tmp_path / row["image"]))
        shape_px = np.all(pixels == COLORS[row["color"]], axis=-1)
        white = np.all(pixels == 255, axis=-1)
        assert shape_px.sum() >= 40 and (shape_px | white).all(), row  # one colour on white, nothing else
        cells.add(_position_of(caption))
    assert {r["shape"] for r in rows} == set(CLASSES) and {r["color"] for r in rows} == set(COLORS)
    assert cells == set(demo.POSITIONS)
    corpus = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    assert "checkerboard" not in corpus and "The background is plain white." in corpus  # same scenes
    rich = generate_demo_data(tmp_path / "rich", num_images=10, num_documents=0)
    assert (rich["task"], rich["possible_scenes"]) == ("rich", 38_880)


@pytest.mark.parametrize("kwargs", [{"num_images": 0}, {"image_size": 8}, {"manifest_fraction": 1.5},
                                    {"num_documents": -1}, {"task": "hard"}])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    with pytest.raises(UserError):
        generate_demo_data(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
