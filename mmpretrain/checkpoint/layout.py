"""Where a run keeps its checkpoints, and what a path on disk is.

`RUN/checkpoints/step-NNNNNNNN/` is one checkpoint; `checkpoint.json` is written last and the folder is
renamed into place, so a folder with it is complete. A run directory stands for its newest complete
checkpoint. `classify` tells a run, a checkpoint, an export (open_clip `local-dir:` layout) and an
open_clip weights file apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmpretrain.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    for child in root.glob("step-*"):
        match = STEP_DIR.match(child.name)
        if match and (child / CHECKPOINT_META).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def resume_hint(run_dir: str | Path) -> str:
    """What to tell a user whose run stopped on a full disk (ends a DiskFull message)."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return "free space and rerun the same command (no checkpoint was written yet)"
    return f"free space and rerun with train.resume=latest to continue from {last.name} (kept as latest)"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def classify(path: str | Path) -> str:
    """"run" | "checkpoint" | "export" | "weights", or a UserError saying what the path is not."""
    # imported here: mmpretrain.models imports torch, and the run log (so `plot --help`) needs this module
    from mmpretrain.models.export import OPEN_CLIP_CONFIG

    p = Path(path)
    if p.is_dir():
        if (p / CHECKPOINT_META).is_file():
            return "checkpoint"
        if (p / OPEN_CLIP_CONFIG).is_file():
            return "export"
        if (p / CHECKPOINTS_DIR).is_dir():
            if latest_checkpoint(p) is None:
                raise UserError(f"checkpoint {path}: run directory without a complete checkpoint in "
                                f"{p / CHECKPOINTS_DIR}; train longer or pass a checkpoint file")
            return "run"
        raise UserError(f"checkpoint {path}: directory is neither a run (no {CHECKPOINTS_DIR}/), a checkpoint "
                        f"(no {CHECKPOINT_META}) nor an export (no {OPEN_CLIP_CONFIG})")
    if p.is_file():
        if p.suffix.lower() not in WEIGHT_SUFFIXES:
            raise UserError(f"checkpoint {path}: unknown kind of file (expected a run or export directory, or "
                            f"a weights file ending in {', '.join(WEIGHT_SUFFIXES)})")
        return "weights"
    raise UserError(f"checkpoint {path}: no such file or directory")
