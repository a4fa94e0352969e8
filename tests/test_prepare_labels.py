"""Class-name labels in manifests: a label column of names becomes KEY.cls indices (sorted names, or
the order of --classnames FILE) with the names in dataset.json, as class folders do; labels that do
not fit are recorded failures; integer columns are unchanged; a bad --classnames file is one line."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmpretrain.cli import main
from mmpretrain.prepare.labels import LabelMap, column_names

COMMON = ["--name", "m", "--workers", "2", "--no-progress", "--val-fraction", "0", "--image-size", "16", "--shard-size", "3"]
LABELS = ["dog", "cat", "zebra", "cat", "ant", "dog", "cat"]  # sorted: ant 0, cat 1, dog 2, zebra 3


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
        names.append(f"img/im{i}.png")
    return names


def _rows(root: Path, labels: list) -> list[dict]:
    return [{"image": path, "caption": f"photo number {i}", "label": label}
            for i, (path, label) in enumerate(zip(_images(root / "img", len(labels)), labels))]


def _write(root: Path, kind: str, rows: list[dict]) -> Path:
    path = root / f"manifest.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _cls_by_caption(out: Path) -> dict[str, int | None]:
    """caption -> KEY.cls of every sample written (None: no .cls)."""
    found = {}
    for shard in sorted((out / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".txt"):
                key = name[:-4]
                found[data.decode()] = int(members[f"{key}.cls"]) if f"{key}.cls" in members else None
    return found


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_class_names_become_sorted_indices_and_dataset_json_names_them(tmp_path, kind):
    manifest = _write(tmp_path, kind, _rows(tmp_path, LABELS))
    out = tmp_path / "out"
    assert main(["prepare", str(manifest), "--out", str(out), *COMMON]) == 0
    names = ["ant", "cat", "dog", "zebra"]
    assert json.loads((out / "dataset.json").read_text())["classes"] == names
    assert _cls_by_caption(out) == {f"photo number {i}": names.index(label) for i, label in enumerate(LABELS)}
    assert not (out / "failures.jsonl").read_text().strip()


def test_classnames_file_sets_the_order_and_unknown_names_are_recorded(tmp_path):
    order = tmp_path / "classes.txt"
    order.write_text("zebra\ndog\ncat\n")  # no "ant"
    manifest = _write(tmp_path, "csv", _rows(tmp_path, LABELS))
    out = tmp_path / "out"
    assert main(["prepare", str(manifest), "--out", str(out), "--classnames", str(order), *COMMON]) == 0
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["zebra", "dog", "cat"]
    index = {"zebra": 0, "dog": 1, "cat": 2}
    assert _cls_by_caption(out) == {f"photo number {i}": index[label] for i, label in enumerate(LABELS)
                                    if label != "ant"}
    failures = _failures(out)
    assert [f["reason"] for f in failures] == ["unknown_label"]
    assert "'ant' is not in the --classnames file; add it there" in failures[0]["detail"] and "manifest.csv:5:" in failures[0]["detail"]  # data row 5
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reasons"] == {"unknown_label": 1}


def test_integers_among_names_are_recorded_and_integer_columns_are_unchanged(tmp_path):
    mixed = _write(tmp_path, "jsonl", _rows(tmp_path, ["cat", 3, "dog", "7", 2.5, None]))
    out = tmp_path / "mixed"
    assert main(["prepare", str(mixed), "--out", str(out), *COMMON]) == 0
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["cat", "dog"]
    assert sorted(f["reason"] for f in _failures(out)) == ["invalid_label", "mixed_labels", "mixed_labels"]
    assert _cls_by_caption(out) == {"photo number 0": 0, "photo number 2": 1, "photo number 5": None}

    integers = _write(tmp_path / "ints", "csv", _rows(tmp_path / "ints", [4, "1", 0, 4]))
    out = tmp_path / "ints-out"
    assert main(["prepare", str(integers), "--out", str(out), *COMMON]) == 0
    assert json.loads((out / "dataset.json").read_text())["classes"] is None
    assert _cls_by_caption(out) == {"photo number 0": 4, "photo number 1": 1, "photo number 2": 0,
                                    "photo number 3": 4}


class _Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_same_bytes(tmp_path, monkeypatch):
    from mmpretrain.prepare import engines

    manifest = _write(tmp_path, "parquet", _rows(tmp_path, LABELS))
    whole, again = tmp_path / "whole", tmp_path / "again"
    assert main(["prepare", str(manifest), "--out", str(whole), *COMMON]) == 0
    original, seen = engines.LocalEngine._consume, {"n": 0}

    def dying_consume(self, result):
        seen["n"] += 1
        if seen["n"] == 5:  # after the first shard of 3, inside the second
            raise _Killed
        original(self, result)

    monkeypatch.setattr(engines.LocalEngine, "_consume", dying_consume)
    with pytest.raises(_Killed):
        main(["prepare", str(manifest), "--out", str(again), *COMMON])
    assert not (again / "dataset.json").exists()
    monkeypatch.setattr(engines.LocalEngine, "_consume", original)
    assert main(["prepare", str(manifest), "--out", str(again), *COMMON]) == 0
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        if name.name not in ("stats.json", "dataset.json"):  # these hold times and the command line
            assert (again / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((again / "dataset.json").read_text())["classes"] == ["ant", "cat", "dog", "zebra"]


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("", "is empty"), ("cat\n\ndog\n", "line 2 is blank"),
    ("cat\ndog\ncat\n", "'cat' on line 3 repeats line 1")])
def test_a_bad_classnames_file_is_one_line(tmp_path, capsys, content, message):
    manifest = _write(tmp_path, "csv", _rows(tmp_path, ["cat", "dog"]))
    names = tmp_path / "names.txt"
    if content is not None:
        names.write_text(content)
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--classnames", str(names),
                 *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(names) in err
    assert not (tmp_path / "out").exists()


def test_a_missing_classnames_file_says_what_to_give(tmp_path, capsys):
    manifest = _write(tmp_path, "csv", _rows(tmp_path, ["cat", "dog"]))
    for names in (tmp_path / "absent.txt", tmp_path / "img"):  # no file; a folder
        assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--classnames", str(names),
                     *COMMON]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(names) in err and "one class name per line" in err
    assert not (tmp_path / "out").exists()


def test_label_map_rules():
    assert column_names(["b", 3, "a", None, "", 2.0, "b"]) == ["a", "b"]
    assert column_names([1, "2", 3.0, None]) is None
    numbers = LabelMap(count=3)
    assert numbers.label("2", "m:1") == (2, None)
    assert numbers.label(5, "m:2")[1][0] == "invalid_label"
    assert LabelMap().label(-1, "m:3") == (-1, None) and LabelMap().label(None, "m:4") == (None, None)
    names = LabelMap(index={"7": 0, "cat": 1})  # a class may be called "7" when a --classnames file says so
    assert names.label(7, "m:5") == (0, None) and names.label(" cat ", "m:6") == (1, None)
    assert names.label(8, "m:7")[1][0] == "mixed_labels" and names.label(True, "m:8")[1][0] == "invalid_label"


def test_labels_int_refuses_are_names_or_recorded_never_a_crash():
    from mmpretrain.prepare.labels import INTEGER, NAME, label_kind

    # "²" is a digit to str.isdigit but not to int(); "+-3" passes lstrip("+-") but not int()
    assert [label_kind(v) for v in ["²", "+-3", "-3", "+3", " 3 ", "٣"]] == [NAME, NAME, INTEGER, INTEGER, INTEGER,
                                                                           INTEGER]
    assert LabelMap().label("٣", "m:1") == (3, None)  # int() reads every Unicode decimal digit
    reason, detail = LabelMap().label("cat", "m:2")[1]  # a name the pass did not see (the file changed)
    assert reason == "invalid_label" and "m:2" in detail
    numbers = LabelMap(count=3)
    assert numbers.label(-1, "m:3")[1][0] == "invalid_label"  # -1 would be the file's last line
    assert numbers.label(0, "m:4") == (0, None) and numbers.label(3, "m:5")[1][0] == "invalid_label"


def test_a_label_int_cannot_read_is_a_class_name_in_a_real_run(tmp_path):
    manifest = _write(tmp_path, "csv", _rows(tmp_path, ["1", "²", "2"]))
    out = tmp_path / "out"
    assert main(["prepare", str(manifest), "--out", str(out), *COMMON]) == 0
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["²"]
    assert _cls_by_caption(out) == {"photo number 1": 0}
    assert json.loads((out / "stats.json").read_text())["reasons"] == {"mixed_labels": 2}


def test_classnames_file_with_integer_labels_bounds_them(tmp_path):
    order = tmp_path / "classes.txt"
    order.write_text("zebra\ndog\ncat\n")
    manifest = _write(tmp_path, "jsonl", _rows(tmp_path, [0, -1, 2, 3]))
    out = tmp_path / "out"
    assert main(["prepare", str(manifest), "--out", str(out), "--classnames", str(order), *COMMON]) == 0
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["zebra", "dog", "cat"]
    assert _cls_by_caption(out) == {"photo number 0": 0, "photo number 2": 2}
    details = sorted(f["detail"] for f in _failures(out) if f["reason"] == "invalid_label")
    assert len(details) == 2 and "label -1 is not a line (0 .. 2)" in details[0] and "label 3" in details[1]


def test_class_folders_and_a_named_manifest_share_the_classnames_file(tmp_path):
    for i, name in enumerate(["dog", "zebra"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "tree" / name / "a.png")
    manifest = _write(tmp_path, "csv", _rows(tmp_path, ["cat", "ant"]))  # ant: not in the file
    order = tmp_path / "classes.txt"
    order.write_text("zebra\ndog\ncat\n")
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "tree"), str(manifest), "--out", str(out), "--classnames", str(order),
                 *COMMON]) == 0
    assert _cls_by_caption(out) == {"a photo of a dog.": 1, "a photo of a zebra.": 0, "photo number 0": 2}
    assert [f["reason"] for f in _failures(out)] == ["unknown_label"]  # a row's failure, not the run's


def test_too_many_distinct_names_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from mmpretrain.prepare import labels

    monkeypatch.setattr(labels, "MAX_CLASSES", 3)
    manifest = _write(tmp_path, "parquet", _rows(tmp_path, ["a", "b", "c", "d"]))
    assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(manifest) in err and "'label'" in err and "--label-column" in err
    assert not (tmp_path / "out").exists()


def test_numeric_parquet_columns_are_not_read_and_a_done_run_reads_no_labels(tmp_path, monkeypatch):
    from mmpretrain.prepare import pipeline, sources

    numeric = _write(tmp_path, "parquet", _rows(tmp_path, [3, None, 1]))
    assert sources._label_values(numeric, "parquet", sources.ColumnOptions()) is None
    named = _write(tmp_path / "n", "parquet", _rows(tmp_path / "n", ["cat", "dog"]))
    assert list(sources._label_values(named, "parquet", sources.ColumnOptions())) == ["cat", "dog"]
    out = tmp_path / "out"
    assert main(["prepare", str(named), "--out", str(out), *COMMON]) == 0

    def no_pass(*args):
        raise AssertionError("a complete run must not read the label column again")

    monkeypatch.setattr(pipeline, "manifest_label_names", no_pass)
    assert main(["prepare", str(named), "--out", str(out), *COMMON]) == 0


def test_eval_zeroshot_finds_the_manifest_names_as_it_does_class_folders(tmp_path):
    from mmpretrain.eval.zeroshot import zeroshot_prompts

    manifest = _write(tmp_path, "jsonl", _rows(tmp_path, LABELS))
    out = tmp_path / "out"
    assert main(["prepare", str(manifest), "--out", str(out), *COMMON]) == 0
    prompts = zeroshot_prompts(None, None, [str(out / "train" / "m-{000000..000002}.tar")])
    assert prompts.classnames == ["ant", "cat", "dog", "zebra"]
    assert prompts.classnames_from == str(out / "dataset.json")
