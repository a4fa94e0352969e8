"""What a run records: `metrics.jsonl` in the run directory (always; one JSON object per line, written
and flushed by the main process) and accelerate's trackers (TensorBoard by default, wandb when asked)."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

from mmpretrain.errors import UserError

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
        self.file = _open_for_append(Path(run_dir) / METRICS_FILE) if self.is_main else None
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(project, config=_flat(config))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One line `{"kind", "step", "time", **values}`; non-finite numbers are written as strings."""
        if self.is_main:
            line = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _json_number(v) for k, v in values.items()}}
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        if self.trackers:
            numbers = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.trackers:
            self.accelerator.end_training()


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
