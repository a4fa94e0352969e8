"""`mmpretrain plot`: metrics.jsonl as a resumed, killed run leaves it -> the values drawn -> one PNG."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from PIL import Image

from mmpretrain.cli.plot import add_parser as add_plot_parser
from mmpretrain.errors import UserError
from mmpretrain.train.plot import plan_panels, plot_run, read_metrics


def _train(step: int, **extra) -> dict:
    t = step / 100
    return {"kind": "train", "step": step, "time": 1.0e9 + step, "epoch": step / 40, "loss": 9.0 - 4 * t,
            "clip_loss": 4.0 - 2 * t, "mlm_loss": 3.0 - t, "ar_loss": 2.0 - t, "lr": 1e-3 * (1 - t / 2),
            "logit_scale": 14.3 + t, "samples_per_s": 800.0 + step, "data_wait": 0.05, "skipped": 0, **extra}


def _eval(step: int) -> dict:
    t = step / 100
    return {"kind": "eval", "step": step, "time": 1.0e9 + step,
            **{f"retrieval/{d}_R@{k}": min(1.0, 0.1 * k * (0.5 + t)) for d in ("text_to_image", "image_to_text")
               for k in (1, 5, 10)},
            "retrieval/text_to_image_mean_rank": 30.0 - 10 * t,
            "zeroshot/acc1": 0.3 * t, "zeroshot/acc5": 0.6 * t, "text/mlm_accuracy": 0.2 * t,
            "text/ar_perplexity": 80.0 / (1 + t)}


def _write_run(run, lines, tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail, encoding="utf-8")


@pytest.fixture
def run(tmp_path):
    """Steps 10..60 and eval at 50, then a resume from step 40's checkpoint logs 50 and 60 again (the later
    lines differ and must win) and goes on to 100 with eval at 100; a kill mid-write cuts the last line."""
    lines = [_train(s) for s in range(10, 70, 10)] + [_eval(50)]
    lines += [_train(50, loss=5.5), _eval(50) | {"zeroshot/acc1": 0.99}, _train(60, loss=5.0)]
    lines += [_train(s) for s in range(70, 110, 10)] + [_eval(100)]
    path = tmp_path / "runs" / "tiny"
    _write_run(path, lines, tail=json.dumps(_train(110))[:37])  # no newline: cut short
    return path


def test_read_metrics_keeps_the_later_line_and_skips_a_cut_line(run):
    m = read_metrics(run / "metrics.jsonl")
    assert list(m.train) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100] and list(m.eval) == [50, 100]
    assert m.unreadable == 1
    assert m.train[50]["loss"] == 5.5 and m.train[60]["loss"] == 5.0 and m.train[40]["loss"] == pytest.approx(7.4)
    assert m.eval[50]["zeroshot/acc1"] == 0.99
    assert "time" not in m.train[10] and "kind" not in m.train[10] and m.train[10]["skipped"] == 0.0


def test_read_metrics_numbers(tmp_path):
    """runlog writes non-finite floats as strings: they stay as gaps; other strings and bools are not values."""
    lines = [{"kind": "train", "step": 2, "loss": "nan", "lr": "inf", "note": "warmup", "flag": True, "clip_loss": 1},
             {"kind": "other", "step": 3, "loss": 1.0}, [1, 2], {"step": 4, "loss": 1.0}, {"kind": "train", "step": "x"}]
    _write_run(tmp_path, lines)
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert set(m.train[2]) == {"loss", "lr", "clip_loss"} and m.train[2]["clip_loss"] == 1.0
    assert math.isnan(m.train[2]["loss"]) and m.train[2]["lr"] == math.inf
    assert list(m.train) == [2] and m.eval == {} and m.unreadable == 3  # list, no kind, step "x"


def test_plan_panels(run):
    panels = plan_panels(read_metrics(run / "metrics.jsonl"))
    by_title = {p.title: p for p in panels}
    assert list(by_title) == ["training losses", "learning rate and logit scale", "evaluation",
                              "evaluation: perplexity", "throughput"]
    losses = by_title["training losses"]
    assert [s.label for s in losses.series] == ["loss", "clip_loss", "mlm_loss", "ar_loss"] and losses.log_y
    assert losses.series[0].steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert losses.series[0].values[4:6] == [5.5, 5.0]
    schedule = by_title["learning rate and logit scale"]
    assert [(s.label, s.right) for s in schedule.series] == [("lr", False), ("logit_scale", True)]
    # fractions only, R@k in k order, a colour per direction; mean rank (not in [0, 1]) left out
    evals = by_title["evaluation"]
    assert [s.label for s in evals.series] == [
        "image→text R@1", "image→text R@5", "image→text R@10", "text→image R@1", "text→image R@5",
        "text→image R@10", "text/mlm_accuracy", "zeroshot/acc1", "zeroshot/acc5"]
    assert len({s.style["color"] for s in evals.series}) == 4
    assert evals.series[7].steps == [50, 100] and evals.series[7].values == [0.99, 0.3]
    ppl = by_title["evaluation: perplexity"]
    assert [s.label for s in ppl.series] == ["text/ar_perplexity"] and ppl.log_y
    speed = by_title["throughput"]
    assert [(s.label, s.right) for s in speed.series] == [("samples/s", False), ("data wait", True)]


def test_plan_panels_skips_what_is_missing(tmp_path):
    """No eval lines, no parts, a loss that is not positive: no eval panels, no log scale."""
    _write_run(tmp_path, [{"kind": "train", "step": s, "loss": 1.0 - s / 10, "lr": 1e-3} for s in (5, 10, 15)])
    panels = plan_panels(read_metrics(tmp_path / "metrics.jsonl"))
    assert [p.title for p in panels] == ["training losses", "learning rate and logit scale"]
    assert not panels[0].log_y and [(s.label, s.right) for s in panels[1].series] == [("lr", False)]


def test_plot_run_writes_a_png_then_the_cli_writes_another(run, tmp_path, capsys):
    out = plot_run(run)
    assert out == run / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and 1000 <= image.width <= 2000 and 800 <= image.height <= 1600
        assert len(image.convert("L").getcolors(1 << 16)) > 20  # drawn, not a blank canvas
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left

    parser = argparse.ArgumentParser(prog="mmpretrain")
    add_plot_parser(parser.add_subparsers(dest="command", required=True))
    explicit = tmp_path / "figures" / "tiny.png"
    args = parser.parse_args(["plot", str(run), "--out", str(explicit)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(explicit)
    with Image.open(explicit) as image:
        assert image.format == "PNG" and image.size == Image.open(out).size


def _one_line_error(run_dir, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        plot_run(run_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope"
    assert f"{missing / 'metrics.jsonl'}: not found (no such folder)" in _one_line_error(missing)
    tmp_path.joinpath("empty").mkdir()
    assert "no metrics.jsonl in it" in _one_line_error(tmp_path / "empty")

    only_eval = tmp_path / "only-eval"
    _write_run(only_eval, [_eval(100)], tail='{"kind": "train", "st')
    assert f"{only_eval / 'metrics.jsonl'}: no train lines yet" in _one_line_error(only_eval)

    nothing = tmp_path / "nothing"
    _write_run(nothing, [{"kind": "train", "step": 10, "epoch": 0.1}])
    assert "no loss, lr or throughput values" in _one_line_error(nothing)

    ok = tmp_path / "ok"
    _write_run(ok, [_train(10)])
    assert "cannot write .txt; use one of" in _one_line_error(ok, out=ok / "curves.txt")
    assert not (ok / "curves.txt").exists()
