"""What a run records, and reading it back: `metrics.jsonl` in the run directory (always; one JSON
object per line, written and flushed by the main process; `read_metrics` reads it) and accelerate's
trackers (TensorBoard by default, wandb when asked).

Lines are `{"kind": "train" | "eval" | "data", "step", "time", ...}`; a "data" line names a defective
shard (shard, problem, missing samples), once per shard and epoch, and is also a warning on stderr."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmpretrain.checkpoint.layout import resume_hint
from mmpretrain.errors import UserError
from mmpretrain.fileio import DiskFull, is_disk_full, writing

METRICS_FILE = "metrics.jsonl"


def check_trackers(trackers: list[str]) -> None:
    """A tracker that is not installed is a config error now, not a warning lost in the log."""
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"logging.trackers: {name!r} is not installed; `pip install {name}` or remove it "
                            "(metrics.jsonl is written either way)")


class RunLog:
    def __init__(self, accelerator, run_dir: Path, project: str, config: dict[str, Any], trackers: list[str]):
        self.accelerator, self.is_main = accelerator, accelerator.is_main_process
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / METRICS_FILE
        with writing(self.path, resume_hint(run_dir)):
            self.file = _open_for_append(self.path) if self.is_main else None
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(project, config=_flat(config))
        self._reported: set[tuple[int, str]] = set()  # (epoch, shard) of the defects already written

    def write(self, kind: str, step: int, values: dict[str, Any], track: bool = True) -> None:
        """One line `{"kind", "step", "time", **values}`; non-finite numbers are written as strings.
        `track`: also send the numbers to the trackers."""
        if self.is_main:
            line = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _json_number(v) for k, v in values.items()}}
            try:
                self.file.write(json.dumps(line) + "\n")
                self.file.flush()
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self._drop_file()
                raise DiskFull(self.path, resume_hint(self.run_dir)) from None
        if self.trackers and track:
            numbers = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=step)

    def shard_defects(self, step: int, defects: list[dict]) -> None:
        """A "data" line and a warning per defective shard (Loader.take_defects, from every process),
        once per shard and epoch however many workers and processes met it."""
        for defect in defects:
            if (defect["epoch"], defect["shard"]) in self._reported:
                continue
            self._reported.add((defect["epoch"], defect["shard"]))
            self.write("data", step, defect, track=False)  # per-shard values are no curve
            if self.is_main:
                tqdm.write(defect_warning(step, defect), file=sys.stderr)

    def _drop_file(self) -> None:
        """After a failed write: the buffered rest cannot be written either, and close() would try."""
        try:
            self.file.close()
        except OSError:
            pass
        self.file = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.trackers:
            self.accelerator.end_training()


def defect_warning(step: int, defect: dict) -> str:
    missing = "an unknown number of" if defect["missing"] is None else defect["missing"]
    return (f"warning: step {step}, epoch {defect['epoch']}: {defect['message']}. Missing: {missing} "
            "samples; training goes on without them")


def _open_for_append(path: Path):
    """Append mode; a line that a killed run left without its newline is closed first, so the
    resumed run's first line does not get glued onto it."""
    fh = open(path, "a+b")
    if fh.tell() > 0:
        fh.seek(-1, 2)
        if fh.read(1) != b"\n":
            fh.write(b"\n")
    fh.close()
    return open(path, "a", encoding="utf-8")


def _json_number(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys and scalar values, as TensorBoard's hparams want them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# -- reading it back ------------------------------------------------------------------------------
@dataclass
class Metrics:
    """Numeric values by step, one dict per kind; each step's values come from its last line."""
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    eval: dict[int, dict[str, float]] = field(default_factory=dict)
    unreadable: int = 0
    """Lines that were not a JSON object with a kind and a step (a write cut short by a kill)."""


def read_metrics(path: str | Path) -> Metrics:
    metrics = Metrics()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                kind, step = row["kind"], int(row["step"])
            except (ValueError, TypeError, KeyError):
                metrics.unreadable += 1
                continue
            target = {"train": metrics.train, "eval": metrics.eval}.get(kind)
            if target is None:
                continue
            values = {k: _number(v) for k, v in row.items() if k not in ("kind", "step", "time")}
            target[step] = {k: v for k, v in values.items() if v is not None}  # a repeated step: later wins
    metrics.train = dict(sorted(metrics.train.items()))
    metrics.eval = dict(sorted(metrics.eval.items()))
    return metrics


def _number(value) -> float | None:
    """A plotted number: ints and floats; the strings runlog writes for non-finite floats ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if not math.isfinite(number) else None
    return None
