"""The table and plot of pipelines/compare_objectives.sh: one row per training objective.

    python pipelines/compare_objectives.py OUT NAME [NAME ...]

reads, for each NAME, `OUT/NAME/{config.yaml, metrics.jsonl, retrieval.json, zeroshot.json, text.json}`
and writes one markdown table (stdout and OUT/comparison.md) and one bar chart (OUT/comparison.png).
A file that is missing leaves its columns as "—" (the contrastive-only run has no text.json).

Torch-free on purpose (mmpretrain.train.plot would import torch through mmpretrain.train): the
comparison of finished runs takes a second, not the ten a torch import costs on a small machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmpretrain.storage import atomic_writer, write_bytes

DASH = "—"
LOSS_PARTS = (("clip_loss", "clip"), ("mlm_loss", "mlm"), ("ar_loss", "ar"), ("pair_loss", "pair"))


@dataclass
class Row:
    name: str
    objective: str
    steps: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    """The last train line's loss parts, by short name (clip, mlm, ar, pair)."""
    t2i_r1: float | None = None
    i2t_r1: float | None = None
    zeroshot_top1: float | None = None
    mlm_accuracy: float | None = None
    ar_perplexity: float | None = None
    samples_per_s: float | None = None
    seed: int | None = None
    missing: list[str] = field(default_factory=list)


# Bar panels: (title, Row attribute, shown as a percentage, higher is better).
METRICS = (
    ("final contrastive loss", "clip_loss", False, False),
    ("text→image R@1", "t2i_r1", True, True),
    ("image→text R@1", "i2t_r1", True, True),
    ("zero-shot top-1", "zeroshot_top1", True, True),
    ("MLM accuracy", "mlm_accuracy", True, True),
    ("AR perplexity", "ar_perplexity", False, False),
    ("samples/s", "samples_per_s", False, True),
)


def objective_label(config: dict | None, fallback: str) -> str:
    """"contrastive", "+MLM", "+AR", "+MLM+AR", "+MLM+AR+SOP" from the run's resolved model section, with
    what else shapes the text branch: "(text batch 8/32)" when it differs from the image-text batch,
    "(text weight → 0 after 50 %)" for a warm-down (loss.text_weight_end)."""
    if not config:
        return fallback
    model = config.get("model", {})
    parts = [tag for key, tag in (("mlm", "MLM"), ("ar", "AR")) if model.get(key)]
    if model.get("sentence_pair"):
        parts.append(str(model["sentence_pair"]).upper())
    if not parts:
        return "contrastive"
    notes = []
    data, loss = config.get("data", {}), config.get("loss", {})
    if data.get("text_batch_size", data.get("batch_size")) != data.get("batch_size"):
        notes.append(f"text batch {data['text_batch_size']}/{data['batch_size']}")
    if loss.get("text_weight_end", 1.0) != 1.0:
        notes.append(f"text weight → {loss['text_weight_end']:g} after {100 * loss.get('text_weight_decay_from', 0):g} %")
    return "+" + "+".join(parts) + (f" ({', '.join(notes)})" if notes else "")


def read_train_lines(path: Path) -> list[dict]:
    """The `"kind": "train"` lines of a metrics.jsonl, in step order; a resumed run's repeated step
    keeps its later line and a line cut short by a kill is skipped (as `mmpretrain plot` does)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train" and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _number(value) -> float | None:
    """Finite numbers only; runlog writes non-finite floats as the strings "nan"/"inf"."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metrics(path: Path, row: Row) -> dict:
    if not path.is_file():
        row.missing.append(path.name)
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("metrics", {})


def collect(out: Path, name: str) -> Row:
    run = out / name
    config_path = run / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    row = Row(name=name, objective=objective_label(config, name))
    seed = (config or {}).get("train", {}).get("seed")
    row.seed = seed if isinstance(seed, int) else None
    metrics_path = run / "metrics.jsonl"
    train = read_train_lines(metrics_path) if metrics_path.is_file() else []
    if not train:
        row.missing.append("metrics.jsonl")
    else:
        last = train[-1]
        row.steps = last["step"]
        row.losses = {short: v for key, short in LOSS_PARTS if (v := _number(last.get(key))) is not None}
        # The first logged step carries start-up costs (worker start, first compile): left out when
        # there are later ones; the median resists a step that shared the machine with something else.
        speeds = [v for rec in train[1:] or train if (v := _number(rec.get("samples_per_s"))) is not None]
        row.samples_per_s = statistics.median(speeds) if speeds else None
    retrieval = _metrics(run / "retrieval.json", row)
    row.t2i_r1 = _number(retrieval.get("text_to_image_R@1"))
    row.i2t_r1 = _number(retrieval.get("image_to_text_R@1"))
    row.zeroshot_top1 = _number(_metrics(run / "zeroshot.json", row).get("acc1"))
    text_path = run / "text.json"
    text = _metrics(text_path, row) if text_path.is_file() else {}  # no text heads: no text.json, not an error
    row.mlm_accuracy = _number(text.get("mlm_accuracy"))
    row.ar_perplexity = _number(text.get("ar_perplexity"))
    return row


def steps_for_budget(run: Path, seconds: float, skip: int = 5) -> int:
    """Optimizer steps that fit in `seconds`, from a calibration run logged every step: the median
    wall time between consecutive train lines after the first `skip` (start-up, shuffle buffer)."""
    train = read_train_lines(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    timed = [(rec["step"], rec["time"]) for rec in train if _number(rec.get("time")) is not None]
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(timed, timed[1:])][skip:]
    if len(gaps) < 3:
        raise SystemExit(f"compare_objectives: {run}/metrics.jsonl has too few timed steps to calibrate; "
                         f"give CALIBRATE_STEPS >= {skip + 4}")
    return max(1, int(seconds / statistics.median(gaps)))


def value(row: Row, attr: str) -> float | None:
    return row.losses.get("clip") if attr == "clip_loss" else getattr(row, attr)


# -- the table -------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:.1f} %"


def _num(v: float | None, digits: int) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    headers = ["objective", "final train loss parts", "text→image R@1", "image→text R@1", "zero-shot top-1",
               "MLM accuracy", "AR perplexity", "samples/s", "steps", "seed"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for r in rows:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in r.losses.items()) or DASH
        cells = [r.objective, losses, _pct(r.t2i_r1), _pct(r.i2t_r1), _pct(r.zeroshot_top1),
                 _pct(r.mlm_accuracy), _num(r.ar_perplexity, 1), _num(r.samples_per_s, 0),
                 DASH if r.steps is None else str(r.steps), DASH if r.seed is None else str(r.seed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnote(rows: list[Row]) -> str:
    steps = sorted({r.steps for r in rows if r.steps is not None})
    note = f"{'/'.join(map(str, steps)) or '?'} steps per run; R@1 and top-1 on held-out shards; " \
           "samples/s: image-text pairs, median over logged steps after the first; — : not measured " \
           "(no such head, or the file is missing)."
    gaps = [f"{r.name}: no {', '.join(r.missing)}" for r in rows if r.missing and r.missing != ["text.json"]]
    return note + ("\n\nMissing: " + "; ".join(gaps) + "." if gaps else "")


# -- the plot --------------------------------------------------------------------------------------
HATCHES = ["", "//", "..", "xx", "\\\\", "--"]  # one per seed


def draw(rows: list[Row]):
    """One panel per metric, one bar per run (an objective's colour is the same in every panel; with
    several seeds, its runs stand side by side, hatched by seed), values on the bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cols = 4
    nrows = math.ceil(len(METRICS) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    steps = sorted({r.steps for r in rows if r.steps is not None})
    span = "?" if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
    fig.suptitle(f"Objectives compared — {span} steps each", fontsize=13)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(METRICS):]:
        ax.set_visible(False)
    # Several seeds: one group of bars per objective (its colour), one bar per seed in it (its hatch).
    objectives = list(dict.fromkeys(r.objective for r in rows))
    seeds = list(dict.fromkeys(r.seed for r in rows))
    seeded = len(seeds) > 1
    width = 0.8 / len(seeds) if seeded else 0.8
    colors = [f"C{objectives.index(r.objective)}" if seeded else f"C{i}" for i, r in enumerate(rows)]
    hatches = [HATCHES[seeds.index(r.seed) % len(HATCHES)] if seeded else "" for r in rows]
    if seeded:
        x = [objectives.index(r.objective) + (seeds.index(r.seed) - (len(seeds) - 1) / 2) * width for r in rows]
        ticks, tick_labels = [], []  # the legend names the objectives: their labels are too long for the axis
    else:
        x = ticks = list(range(len(rows)))
        tick_labels = [r.objective for r in rows]
    for ax, (title, attr, pct, higher) in zip(axes, METRICS):
        vals = [value(r, attr) for r in rows]
        scale = 100.0 if pct else 1.0
        shown = [0.0 if v is None else v * scale for v in vals]
        bars = ax.bar(x, shown, width=width, color=colors, hatch=hatches, edgecolor="white" if seeded else None)
        top = max(shown, default=0.0) or 1.0
        for bar, v in zip(bars, vals):
            label = DASH if v is None else _bar_label(v * scale, pct)
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7 if seeded else 8)
        ax.set_ylim(0, top * 1.18)
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.set_ylabel("%" if pct else "")
        if seeded:
            ax.set_xticks(ticks, tick_labels, fontsize=7)
        else:
            ax.set_xticks(ticks, tick_labels, rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    if seeded:
        handles = [Patch(color=f"C{i}", label=o) for i, o in enumerate(objectives)]
        handles += [Patch(facecolor="0.6", edgecolor="white", hatch=HATCHES[i % len(HATCHES)], label=f"seed {seed}")
                    for i, seed in enumerate(seeds)]
    else:
        handles = [Patch(color=c, label=r.objective) for c, r in zip(colors, rows)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=9)
    return fig


def _bar_label(v: float, pct: bool) -> str:
    """Enough digits to tell close objectives apart (losses 3.504 vs 3.509), no more."""
    if pct or abs(v) >= 10:
        return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.3f}"


def compare(out: Path, names: list[str]) -> str:
    """Collect the runs, write OUT/comparison.md and OUT/comparison.png; returns the markdown."""
    rows = [collect(out, name) for name in names]
    text = markdown_table(rows) + "\n\n" + footnote(rows) + "\n"
    write_bytes(out / "comparison.md", text)
    with atomic_writer(out / "comparison.png") as fh:  # a reader never sees half a PNG
        draw(rows).savefig(fh, format="png")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder holding one run directory per objective")
    p.add_argument("names", nargs="+", help="run directory names under OUT, in table order")
    p.add_argument("--steps-for-budget", type=float, metavar="SECONDS",
                   help="print the steps that fit in SECONDS, timed from the calibration run OUT/NAME, and exit")
    args = p.parse_args(argv)
    if args.steps_for_budget is not None:
        print(steps_for_budget(args.out / args.names[0], args.steps_for_budget))
        return 0
    absent = [n for n in args.names if not (args.out / n).is_dir()]
    if absent:
        print(f"compare_objectives: no run folder {', '.join(str(args.out / n) for n in absent)}", file=sys.stderr)
        return 2
    print(compare(args.out, args.names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
