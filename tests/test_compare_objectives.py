"""pipelines/compare_objectives.py on synthetic run folders: the numbers in the table are the ones in the
files, missing measurements read "—", and the plot is one PNG written atomically. No training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_objectives", ROOT / "pipelines" / "compare_objectives.py")
co = importlib.util.module_from_spec(_spec)
sys.modules["compare_objectives"] = co  # dataclasses look their module up there
_spec.loader.exec_module(co)

HEADS = {  # name: (mlm, ar, sentence_pair)
    "contrastive": (False, False, None),
    "mlm": (True, False, None),
    "ar": (False, True, None),
    "mlm-ar": (True, True, None),
    "sop": (True, True, "sop"),
}


def make_run(out: Path, name: str, *, t2i: float, speeds=(50.0, 100.0, 120.0, 110.0), evals=True) -> Path:
    mlm, ar, pair = HEADS[name]
    run = out / name
    run.mkdir(parents=True)
    config = {"model": {"name": "tiny", "mlm": mlm, "ar": ar, "sentence_pair": pair}, "train": {"steps": 30, "seed": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i, speed in enumerate(speeds):
        step = 10 * i
        rec = {"kind": "train", "step": step, "time": 1000.0 + 2.0 * step, "loss": 5.0 - i, "clip_loss": 3.0 - 0.5 * i,
               "samples_per_s": speed}
        if mlm:
            rec["mlm_loss"] = 9.0 - i
        if ar:
            rec["ar_loss"] = 8.0 - i
        if pair:
            rec["pair_loss"] = 0.7
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"kind": "eval", "step": 30, "retrieval/text_to_image_R@1": 0.9}))
    # A resumed run repeats step 30; the later line wins. A kill left half a line.
    lines.append(json.dumps({"kind": "train", "step": 30, "loss": 1.5, "clip_loss": 1.25, "samples_per_s": 110.0,
                             **({"mlm_loss": 6.5} if mlm else {}), **({"ar_loss": 5.5} if ar else {}),
                             **({"pair_loss": 0.5} if pair else {})}))
    lines.append('{"kind": "train", "step": 40, "lo')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evals:
        (run / "retrieval.json").write_text(json.dumps(
            {"task": "retrieval", "metrics": {"text_to_image_R@1": t2i, "image_to_text_R@1": t2i / 2}}))
        (run / "zeroshot.json").write_text(json.dumps({"task": "zeroshot", "metrics": {"acc1": 0.5, "acc5": 0.9}}))
    if mlm or ar:
        text = {**({"mlm_accuracy": 0.125} if mlm else {}), **({"ar_perplexity": 1234.5} if ar else {})}
        (run / "text.json").write_text(json.dumps({"task": "text", "metrics": text}))
    return run


@pytest.fixture
def runs(tmp_path):
    for i, name in enumerate(HEADS):
        make_run(tmp_path, name, t2i=0.1 * (i + 1))
    return tmp_path


def table(out: Path, names: list[str]) -> str:
    """compare()'s text without drawing the plot (the plot has its own tests)."""
    rows = [co.collect(out, name) for name in names]
    return co.markdown_table(rows) + "\n\n" + co.footnote(rows)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """objective -> its cells, from the markdown table."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_table_holds_the_numbers_of_the_files(runs):
    rows = table_rows(table(runs, list(HEADS)))
    assert list(rows) == ["contrastive", "+MLM", "+AR", "+MLM+AR", "+MLM+AR+SOP"]
    loss, t2i, i2t, top1, mlm_acc, ppl, speed, steps, seed = rows["+MLM+AR"]
    assert (steps, seed) == ("30", "3")  # the last train step, the config's train.seed
    # The last train line (the resumed step 30, not the cut line): every part, short names.
    assert loss == "clip 1.250, mlm 6.500, ar 5.500"
    assert (t2i, i2t, top1) == ("40.0 %", "20.0 %", "50.0 %")
    assert (mlm_acc, ppl) == ("12.5 %", "1234.5")
    assert speed == "110"  # median of 100, 120, 110 (the first logged step, 50, is start-up)
    assert rows["+MLM+AR+SOP"][0] == "clip 1.250, mlm 6.500, ar 5.500, pair 0.500"


def test_missing_heads_read_dash(runs):
    rows = table_rows(table(runs, list(HEADS)))
    assert rows["contrastive"][0] == "clip 1.250"
    assert rows["contrastive"][4:6] == ["—", "—"]  # no text heads, no text.json
    assert rows["+MLM"][4:6] == ["12.5 %", "—"]  # MLM only: no perplexity
    assert rows["+AR"][4:6] == ["—", "1234.5"]


def test_missing_eval_file_reads_dash_and_is_named(tmp_path):
    make_run(tmp_path, "contrastive", t2i=0.3)
    make_run(tmp_path, "mlm-ar", t2i=0.3, evals=False)
    text = table(tmp_path, ["contrastive", "mlm-ar"])
    rows = table_rows(text)
    assert rows["+MLM+AR"][1:4] == ["—", "—", "—"]
    assert "mlm-ar: no retrieval.json, zeroshot.json" in text
    assert "contrastive: no" not in text  # a run without text heads has no text.json by design


def test_outputs_written_atomically_without_pyplot(runs):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    text = co.compare(runs, list(HEADS))
    assert (runs / "comparison.md").read_text(encoding="utf-8") == text
    png = (runs / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1200 and height >= 600  # 7 panels, readable
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".")]  # no temporary files left
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_plot_has_one_panel_per_metric_and_one_bar_per_objective(runs):
    rows = [co.collect(runs, name) for name in HEADS]
    fig = co.draw(rows)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in visible] == [m[0] for m in co.METRICS]
    for ax in visible:
        assert len(ax.patches) == len(HEADS)
    zeroshot = visible[3]
    assert [round(p.get_height(), 6) for p in zeroshot.patches] == [50.0] * len(HEADS)  # percent
    mlm = visible[4]
    assert [t.get_text() for t in mlm.texts] == ["—", "12.5", "—", "12.5", "12.5"]


def test_main_refuses_a_missing_run_folder(tmp_path, capsys):
    make_run(tmp_path, "contrastive", t2i=0.3)
    assert co.main([str(tmp_path), "contrastive", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "comparison.md").exists()


def test_objective_label_from_config():
    assert co.objective_label(None, "dir-name") == "dir-name"
    assert co.objective_label({"model": {"mlm": False, "ar": False}}, "x") == "contrastive"
    assert co.objective_label({"model": {"mlm": True, "ar": False, "sentence_pair": "nsp"}}, "x") == "+MLM+NSP"
    shaped = {"model": {"mlm": True, "ar": True}, "data": {"batch_size": 32, "text_batch_size": 8},
              "loss": {"text_weight_end": 0.0, "text_weight_decay_from": 0.5}}
    assert co.objective_label(shaped, "x") == "+MLM+AR (text batch 8/32, text weight → 0 after 50 %)"
    plain = {"model": {"mlm": False, "ar": False}, "data": {"batch_size": 32, "text_batch_size": 8}}
    assert co.objective_label(plain, "x") == "contrastive"  # no text branch: nothing to shape


def test_steps_for_budget_from_the_calibration_runs_step_times(tmp_path):
    """Steps that fit in the budget: the median seconds per step between consecutive train lines,
    start-up lines left out; too few timed steps is a one-line exit."""
    run = tmp_path / "cal"
    run.mkdir()
    times = [0.0, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.1, 8.6, 9.1, 11.1, 11.6]  # 0.5 s a step, one slow step
    lines = [json.dumps({"kind": "train", "step": i + 1, "time": 100 + t}) for i, t in enumerate(times)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert co.steps_for_budget(run, 60.0, skip=1) == 120  # median 0.5 s
    assert co.main([str(tmp_path), "cal", "--steps-for-budget", "30"]) == 0
    (run / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(SystemExit, match="too few timed steps"):
        co.steps_for_budget(run, 60.0)


def test_plot_names_the_seed_when_runs_have_several(tmp_path):
    for name in ("contrastive", "mlm"):
        run = make_run(tmp_path, name, t2i=0.3)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["train"]["seed"] = 0 if name == "contrastive" else 1
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    fig = co.draw([co.collect(tmp_path, n) for n in ("contrastive", "mlm")])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["contrastive", "+MLM", "seed 0", "seed 1"]
    assert [p.get_hatch() or "" for p in fig.axes[0].patches] == ["", "//"]  # each bar hatched by its seed


def test_plot_groups_the_seeds_of_an_objective(tmp_path):
    """Two objectives x two seeds: the bars of one objective stand side by side in its colour, around its tick."""
    rows = []
    for name, seed in (("contrastive", 0), ("mlm", 0), ("contrastive", 1), ("mlm", 1)):
        run = make_run(tmp_path / f"s{seed}", name, t2i=0.3 + 0.1 * seed)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["train"]["seed"] = seed
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        rows.append(co.collect(tmp_path / f"s{seed}", name))
    fig = co.draw(rows)
    ax = fig.axes[1]  # text->image R@1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["contrastive", "+MLM", "seed 0", "seed 1"]
    centres = [round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches]
    assert centres == [-0.2, 0.8, 0.2, 1.2]  # row order: seed 0 left of its tick, seed 1 right
    assert [round(p.get_height(), 6) for p in ax.patches] == [30.0, 30.0, 40.0, 40.0]
    assert ax.patches[0].get_facecolor() == ax.patches[2].get_facecolor() != ax.patches[1].get_facecolor()
