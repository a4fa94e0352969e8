"""Checkpoints of a run: written atomically, the last K kept, restored exactly.

A checkpoint is `RUN/checkpoints/step-NNNNNNNN/` (layout in mmpretrain.checkpoint.load): accelerate's
state (model, optimizer, scheduler, grad scaler, the RNG of every process), one `loader_R.json` per
process (where each of its loaders stands), and `checkpoint.json`. Everything is written into
`.tmp-step-NNNNNNNN/` first; `checkpoint.json` goes in last and the directory is renamed into place,
so a run killed at any moment leaves either the complete checkpoint or none (the temp directory is
cleared by the next save).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mmpretrain.checkpoint.layout import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    CHECKPOINTS_DIR,
    checkpoint_dirs,
    checkpoint_name,
    classify,
    latest_checkpoint,
)
from mmpretrain.checkpoint.meta import read_checkpoint_meta
from mmpretrain.errors import UserError


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: dict[str, Any], loaders: dict[str, Any],
                    keep: int, model=None) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory."""
    from accelerate.utils import DistributedType

    root = Path(run_dir) / CHECKPOINTS_DIR
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if model is not None and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Their save_state writes their own layouts (pytorch_model_fsdp*.bin, DeepSpeed's engine
        # folders); eval and export read model.safetensors, so the full weights are written too.
        state = accelerator.get_state_dict(model)  # collective: gathers the full state on the main process
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / CHECKPOINT_WEIGHTS))
    states = {name: loader.state_dict() for name, loader in loaders.items()}
    (tmp / f"loader_{accelerator.process_index}.json").write_text(json.dumps(states))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        full = {**meta, "step": step, "world_size": accelerator.num_processes}
        (tmp / CHECKPOINT_META).write_text(json.dumps(full, indent=2, default=str) + "\n")
        if final.exists():  # the same step saved again after a resume: the new one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `train.resume` names: None, "latest" (None when the run has none yet), or a path."""
    if resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise UserError(f"{run_dir} already holds checkpoints; pass train.resume=latest to continue that "
                            "run, or choose another train.output_dir")
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    kind = classify(resume)
    if kind == "run":
        return latest_checkpoint(resume)
    if kind != "checkpoint":
        raise UserError(f"train.resume={resume}: not a training checkpoint or run directory "
                        "(exports and open_clip files start a run through model.pretrained instead)")
    return Path(resume)


def load_checkpoint(accelerator, path: Path, loaders: dict[str, Any]) -> dict[str, Any]:
    """Collective: restore everything `save_checkpoint` wrote; returns the checkpoint's meta."""
    meta = read_checkpoint_meta(path)
    if meta.get("world_size") != accelerator.num_processes:
        raise UserError(f"{path} was written by {meta.get('world_size')} processes, this run has "
                        f"{accelerator.num_processes}; exact resume needs the same number (the data "
                        "position is per process)")
    accelerator.load_state(str(path))
    states = json.loads((Path(path) / f"loader_{accelerator.process_index}.json").read_text())
    for name, loader in loaders.items():
        if name not in states:
            raise UserError(f"{path} has no position for the {name} loader; resume with the same data settings")
        loader.load_state_dict(states[name])
    return meta
