"""The report PNG: what it shows (outline on the caption's own image, bars), that it is written
atomically, and that an empty or inconsistent request is a one-line error."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpretrain.errors import UserError
from mmpretrain.eval import report
from mmpretrain.eval.report import RetrievalExample, render_report, retrieval_examples
from mmpretrain.eval.retrieval import top_k


def _data():
    """6 images on the axes of R^6; caption t of image i points at i, except caption 6 (of image 0)
    which points at image 5 and half-way at image 0, so its own image ranks 2nd."""
    image = torch.eye(6)
    t2i = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    text = torch.eye(6)[[0, 1, 2, 3, 4, 5, 5]]
    text[6, 0] = 0.5
    return image, text, t2i


def _colour_image(i: int) -> Image.Image:
    return Image.new("RGB", (90 + 10 * i, 60), (40 * i, 200 - 30 * i, 100))


def test_retrieval_examples_follow_top_k():
    image, text, t2i = _data()
    captions = [f"caption {t}" for t in range(7)]
    loaded = []

    def load(i):
        loaded.append(i)
        return _colour_image(i)

    examples = retrieval_examples(text, image, t2i, captions, load, queries=[2, 6], k=3)
    assert [e.caption for e in examples] == ["caption 2", "caption 6"]
    assert sorted(loaded) == sorted(top_k(text[[2, 6]], image, 3).flatten().tolist())  # only what is shown
    assert examples[0].correct == [True, False, False] and examples[0].positive_rank == 1
    assert examples[1].correct == [False, True, False] and examples[1].positive_rank == 2
    assert examples[1].scores == pytest.approx([1.0, 0.5, 0.0])


def test_report_outlines_the_own_image(tmp_path):
    image, text, t2i = _data()
    examples = retrieval_examples(text, image, t2i, [f"caption {t}" for t in range(7)], _colour_image,
                                  queries=[0, 6])
    out = render_report(tmp_path / "sub" / "report.png", retrieval_examples=examples,
                        class_accuracy={"cat": 0.25, "dog": 1.0, "empty": None}, summary={"R@1": 0.5})
    assert out == tmp_path / "sub" / "report.png" and [p.name for p in out.parent.iterdir()] == ["report.png"]
    with Image.open(out) as png:
        assert png.format == "PNG"
        sheet = png.convert("RGB")
    # Find the rows' thumbnails by geometry: the first row's #1 and the second row's #2 are outlined.
    header = report.PAD + 24 + report.LINE_H + report.PAD // 2
    row_h = report.THUMB + 2 * report.LINE_H + report.PAD
    for row, col in ((0, 0), (1, 1)):
        x = report.PAD + report.CAPTION_W + col * (report.THUMB + report.PAD)
        y = header + 28 + row * row_h
        assert sheet.getpixel((x - 3, y + report.THUMB // 2)) == report.CORRECT
        other = x + (report.THUMB + report.PAD) * (1 if col == 0 else -1)
        assert sheet.getpixel((other - 3, y + report.THUMB // 2)) != report.CORRECT


def test_many_classes_show_worst_and_best(tmp_path):
    accuracy = {f"class {c}": c / 999 for c in range(1000)}
    out = render_report(tmp_path / "r.png", class_accuracy=accuracy)
    shown, heading = report._bars_to_show(accuracy)
    assert "20 worst and 20 best of 1000" in heading
    names = [n for n, _ in shown]
    assert names[:2] == ["class 0", "class 1"] and names[-1] == "class 999"
    assert len(names) == report.MAX_BARS + 1  # + the gap row
    with Image.open(out) as png:
        assert png.height < 1200  # readable, not 1000 bars


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "report.png"
    path.write_bytes(b"previous report")

    def broken_save(self, fp, *args, **kwargs):  # half a PNG written, then the disk fills
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG half")
        else:
            Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        render_report(path, class_accuracy={"cat": 0.5})
    assert path.read_bytes() == b"previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary left behind


def test_report_bad_input(tmp_path):
    image, text, t2i = _data()
    with pytest.raises(ValueError, match="nothing to draw") as info:
        render_report(tmp_path / "r.png")
    assert isinstance(info.value, UserError)
    assert not (tmp_path / "r.png").exists()
    with pytest.raises(ValueError, match="6 captions for 7 text embeddings"):
        retrieval_examples(text, image, t2i, ["c"] * 6, _colour_image, queries=[0])
    with pytest.raises(ValueError, match=r"queries\[1\] = 7 is out of range for 7 captions"):
        retrieval_examples(text, image, t2i, ["c"] * 7, _colour_image, queries=[0, 7])


def test_example_drawn_without_scores(tmp_path):
    example = RetrievalExample("a caption " * 40, [_colour_image(1), _colour_image(2)], [False, False],
                               positive_rank=12)
    with Image.open(render_report(tmp_path / "r.png", retrieval_examples=[example])) as png:
        assert png.width >= report.CAPTION_W + 2 * report.THUMB
