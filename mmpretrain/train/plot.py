"""Training curves of a run: `RUN/metrics.jsonl` (mmpretrain.train.runlog) drawn as one PNG.

`mmpretrain plot RUN [--out PNG]`. Reading is forgiving where a live or killed run leaves marks: a line
cut short by a kill mid-write is skipped, a resumed run's repeated steps keep the later line, and
non-finite numbers (written as "nan"/"inf" strings) become gaps. Drawing uses `matplotlib.figure.Figure`
with the Agg canvas directly, so no pyplot global state (backend, current figure) is touched.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmpretrain.errors import UserError
from mmpretrain.storage import atomic_writer
from mmpretrain.train.runlog import METRICS_FILE, Metrics, read_metrics

log = logging.getLogger(__name__)
DEFAULT_OUT = "curves.png"
LOSS_ORDER = ("loss", "clip_loss", "mlm_loss", "ar_loss", "pair_loss")  # the rest follow by name


@dataclass
class Series:
    label: str
    steps: list[int]
    values: list[float]
    right: bool = False  # on the panel's twin y axis
    style: dict = field(default_factory=dict)


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series]
    log_y: bool = False
    right_label: str = ""
    right_fraction: bool = False  # the twin axis shows a fraction as 0-100 %


def _series(rows: dict[int, dict[str, float]], key: str, **kwargs) -> Series:
    steps = [s for s, row in rows.items() if key in row]
    return Series(kwargs.pop("label", key), steps, [rows[s][key] for s in steps], **kwargs)


def _all_positive(series: list[Series]) -> bool:
    finite = [v for s in series for v in s.values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def plan_panels(metrics: Metrics) -> list[Panel]:
    """What to draw, from the data alone: panels without data are left out."""
    train, evals = metrics.train, metrics.eval
    train_keys = {k for row in train.values() for k in row}
    eval_keys = sorted({k for row in evals.values() for k in row})
    panels = []

    losses = [k for k in LOSS_ORDER if k in train_keys]
    losses += sorted(k for k in train_keys if k.endswith("_loss") and k not in LOSS_ORDER)
    if losses:
        series = [_series(train, k, style={"lw": 2.0, "color": "black"} if k == "loss" else {"lw": 1.2})
                  for k in losses]
        panels.append(Panel("training losses", "loss", series, log_y=_all_positive(series)))

    both = {"lr", "logit_scale"} <= train_keys  # a twin axis only when both are there
    schedule = [_series(train, k, right=both and k == "logit_scale") for k in ("lr", "logit_scale") if k in train_keys]
    if schedule:
        left = "learning rate" if "lr" in train_keys else "logit scale (exp)"
        panels.append(Panel("learning rate and logit scale", left, schedule,
                            right_label="logit scale (exp)" if both else ""))

    perplexity = [k for k in eval_keys if "perplexity" in k]
    fractions = [k for k in eval_keys if k not in perplexity and not _is_count(k)
                 and all(0.0 <= row[k] <= 1.0 for row in evals.values() if k in row and math.isfinite(row[k]))]
    if fractions:
        panels.append(Panel("evaluation", "recall / accuracy", _eval_series(evals, fractions)))
    if perplexity:
        series = [_series(evals, k, label=_eval_label(k), style={"marker": "o", "ms": 4}) for k in perplexity]
        panels.append(Panel("evaluation: perplexity", "perplexity", series, log_y=_all_positive(series)))

    both = {"samples_per_s", "data_wait"} <= train_keys
    speed = [_series(train, k, label={"samples_per_s": "samples/s", "data_wait": "data wait"}[k],
                     right=both and k == "data_wait", style={"lw": 1.0})
             for k in ("samples_per_s", "data_wait") if k in train_keys]
    if speed:
        wait = "data wait (share of step)"
        panels.append(Panel("throughput", "samples/s" if "samples_per_s" in train_keys else wait, speed,
                            right_label=wait if both else "", right_fraction=True))
    return panels


TOP_K = re.compile(r"(R@|acc)(\d+)$")  # retrieval/text_to_image_R@5, zeroshot/acc1


def _is_count(key: str) -> bool:
    """Counts logged beside the metrics (num_images, mlm_tokens, unlabelled): not rates, not plotted."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith("num_") or name.endswith("_tokens") or name == "unlabelled"


def _eval_label(key: str) -> str:
    """retrieval/text_to_image_R@5 -> text→image R@5 (R@k says retrieval); others keep their prefix."""
    return key.removeprefix("retrieval/").replace("_to_", "→").replace("_R@", " R@")


def _eval_series(evals: dict[int, dict[str, float]], keys: list[str]) -> list[Series]:
    """One colour per metric family, one line style per k: R@1/5/10 of a direction read as a group."""
    def family(key: str) -> str:
        return TOP_K.sub(r"\1", key)

    def k(key: str) -> int:
        match = TOP_K.search(key)
        return int(match.group(2)) if match else 0

    keys = sorted(keys, key=lambda key: (family(key), k(key)))  # R@1, R@5, R@10, not R@1, R@10, R@5
    families = list(dict.fromkeys(family(key) for key in keys))
    styles = ["-", "--", ":", "-."]
    out = []
    for key in keys:
        rank = [other for other in keys if family(other) == family(key)].index(key)
        style = {"color": f"C{families.index(family(key)) % 10}", "ls": styles[rank % len(styles)],
                 "marker": "o", "ms": 3}
        out.append(_series(evals, key, label=_eval_label(key), style=style))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN/metrics.jsonl to `out` (default RUN/curves.png), written atomically; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        where = "no such folder" if not run_dir.is_dir() else f"no {METRICS_FILE} in it"
        raise UserError(f"{path}: not found ({where}); pass a run directory (train.output_dir) of a run "
                        "that has started")
    metrics = read_metrics(path)
    if metrics.unreadable:
        log.warning("%s: skipped %d unreadable line(s) (a write cut short when a run was killed)",
                    path, metrics.unreadable)
    if not metrics.train:
        raise UserError(f"{path}: no train lines yet; a run logs every logging.log_every steps, plot again "
                        "after its first log")
    panels = plan_panels(metrics)
    if not panels:
        raise UserError(f"{path}: the train lines hold no loss, lr or throughput values to plot")
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    last = max([*metrics.train, *metrics.eval])
    _save(_draw(panels, f"{run_dir.resolve().name} — step {last}", last), out)
    return out


def _draw(panels: list[Panel], title: str, last_step: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        twin = ax.twinx() if any(s.right for s in panel.series) else None
        handles = []
        for i, s in enumerate(panel.series):
            target = twin if s.right else ax
            style = {"color": f"C{i}", **s.style}
            handles += target.plot(s.steps, s.values, label=s.label, **style)
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.set_xlim(0, max(last_step, 1))
        ax.grid(True, alpha=0.3)
        if twin is not None:
            twin.set_ylabel(panel.right_label)
            for axis, lines in ((ax, ax.get_lines()), (twin, twin.get_lines())):
                if len(lines) == 1:  # one series a side: the axis takes its colour
                    axis.yaxis.label.set_color(lines[0].get_color())
                    axis.tick_params(axis="y", colors=lines[0].get_color())
            if panel.right_fraction:
                twin.set_ylim(0, 1)
                twin.yaxis.set_major_formatter(PercentFormatter(1.0))
        if len(handles) > 5:  # many eval metrics: below the panel, not over the curves
            ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
        else:
            ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    return fig


def _save(fig, out: Path) -> None:
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"{out}: cannot write .{fmt}; use one of "
                        + ", ".join(f".{k}" for k in sorted(fig.canvas.get_supported_filetypes())))
    with atomic_writer(out) as fh:
        fig.savefig(fh, format=fmt)
