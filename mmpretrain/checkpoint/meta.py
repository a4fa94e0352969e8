"""`checkpoint.json`: what a checkpoint holds (format, version, step, model config, heads, training
config; the trainer adds the world size and the list of parts written).

Version 2 is the safe format (JSON and safetensors only, mmpretrain.checkpoint.state); version 1
checkpoints hold accelerate's pickled state beside `model.safetensors` and are read for their weights
only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpretrain.checkpoint.layout import CHECKPOINT_META
from mmpretrain.checkpoint.parts import invalid, read_json
from mmpretrain.models.heads import Heads

CHECKPOINT_FORMAT = "mmpretrain.checkpoint"
CHECKPOINT_VERSION = 2


def checkpoint_meta(step: int, model_config: dict[str, Any], heads: Heads,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `checkpoint.json` holds (the trainer adds its own entries)."""
    import mmpretrain

    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "model_config": model_config,
            "heads": vars(heads).copy(), "config": config, "mmpretrain_version": mmpretrain.__version__}


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / CHECKPOINT_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise invalid(meta_path, f"no \"format\": \"{CHECKPOINT_FORMAT}\"")
    return meta
