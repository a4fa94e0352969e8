"""`checkpoint.json`: what a checkpoint holds (format, step, model config, heads, training config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpretrain.checkpoint.layout import CHECKPOINT_META
from mmpretrain.errors import UserError
from mmpretrain.fileio import read_json
from mmpretrain.models.heads import Heads

CHECKPOINT_FORMAT = "mmpretrain.checkpoint"


def checkpoint_meta(step: int, model_config: dict[str, Any], heads: Heads,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `checkpoint.json` holds (the trainer adds its own entries)."""
    import mmpretrain

    return {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "model_config": model_config,
            "heads": vars(heads).copy(), "config": config, "mmpretrain_version": mmpretrain.__version__}


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / CHECKPOINT_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{meta_path}: not an mmpretrain checkpoint description (no \"format\": "
                        f"\"{CHECKPOINT_FORMAT}\")")
    return meta
