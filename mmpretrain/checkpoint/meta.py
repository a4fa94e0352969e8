"""`checkpoint.json`: what a checkpoint holds (format, version, step, model config, heads, training
config, and the user's original open_clip layout when model.name was a stock config; the trainer
adds the world size and the list of parts written).

Version 2 is the safe format (JSON and safetensors only, mmpretrain.checkpoint.state); version 1
checkpoints hold accelerate's pickled state beside `model.safetensors` and are read for their weights
only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpretrain.checkpoint.layout import CHECKPOINT_META
from mmpretrain.checkpoint.parts import invalid, read_json
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import ORIGINAL_LAYOUT_KEY, remembered_layout

CHECKPOINT_FORMAT = "mmpretrain.checkpoint"
CHECKPOINT_VERSION = 2


def checkpoint_meta(step: int, model_config: dict[str, Any], heads: Heads,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `checkpoint.json` holds (the trainer adds its own entries)."""
    import mmpretrain

    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "model_config": model_config,
            "heads": vars(heads).copy(), "config": config, "mmpretrain_version": mmpretrain.__version__}
    original = _original_layout(config)
    if original is not None:  # `mmpretrain export --stock-vocab` writes it back
        meta[ORIGINAL_LAYOUT_KEY] = original
    return meta


def _original_layout(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The user's own layout (a stock open_clip config) of the run's model.name, when it was adapted."""
    name = ((config or {}).get("model") or {}).get("name")
    return remembered_layout(name) if isinstance(name, str) else None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / CHECKPOINT_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise invalid(meta_path, f"no \"format\": \"{CHECKPOINT_FORMAT}\"")
    return meta
