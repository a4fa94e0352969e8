"""Every form a trained model is kept in, and one loader for all of them.

- A **training checkpoint**: a directory `RUN/checkpoints/step-NNNNNNNN/` holding `model.safetensors`
  (the MultitaskModel state dict: `tower.*` under open_clip's names, `mlm_head.*`, `pair_head.*`),
  the trainer's optimizer/scheduler/RNG/loader state, and `checkpoint.json` (step, model config,
  heads, resolved training config). `checkpoint.json` is written last, and the directory is renamed
  into place, so a directory with it is complete.
- A **run directory**: `RUN/` with `checkpoints/`; it stands for its newest complete checkpoint.
- An **exported directory** (`mmpretrain export`): open_clip's `local-dir:` layout —
  `open_clip_config.json` ({model_cfg, preprocess_cfg}) and `open_clip_model.safetensors` (the dual
  tower) — plus `mmpretrain_heads.safetensors` / `mmpretrain_heads.json` (text heads) and
  `mmpretrain_tokenizer.json` (the vocabulary's special tokens), which open_clip ignores.
- An **open_clip weights file** (release file, open_clip_train checkpoint) with its model config
  (a shipped model name, a .json, or an open_clip model name): the dual tower only, no text heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpretrain.checkpoint.layout import CHECKPOINT_META, CHECKPOINT_WEIGHTS, classify, latest_checkpoint
from mmpretrain.checkpoint.meta import read_checkpoint_meta
from mmpretrain.checkpoint.parts import read_tensors
from mmpretrain.errors import UserError
from mmpretrain.fileio import read_json
from mmpretrain.models.export import HEADS_META, HEADS_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import (
    ORIGINAL_LAYOUT_KEY,
    image_size,
    is_stock,
    model_config_from,
    original_layout,
    remembered_layout,
    validate_model_config,
)
from mmpretrain.models.weights import load_open_clip_weights, mismatch, shapes_of, strip_prefixes


@dataclass
class LoadedModel:
    model: Any  # MultitaskModel, in eval mode
    model_config: dict[str, Any]
    heads: Heads
    kind: str  # "checkpoint" | "export" | "open_clip"
    path: str  # the file or directory the weights came from
    step: int | None = None
    notes: list[str] = field(default_factory=list)
    original: dict[str, Any] | None = None
    """The open_clip layout the model came from (model_config.original_layout), for `export --stock-vocab`."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "step": self.step, "heads": vars(self.heads).copy(),
                "image_size": image_size(self.model_config),
                "context_length": self.model_config["text_cfg"].get("context_length", 77)}


def load_model(path: str | Path, model_config: str | None = None) -> LoadedModel:
    """The model behind `path` (any form above), in eval mode on the CPU.

    `model_config` is required for an open_clip weights file and, for the other forms, must agree
    with the stored architecture when given (a mismatch is an error, not a silent choice).
    """
    kind = classify(path)
    if kind == "weights":
        return _load_open_clip_file(Path(path), model_config)
    if kind == "export":
        loaded = _load_export(Path(path))
    else:
        ckpt = latest_checkpoint(path) if kind == "run" else Path(path)
        loaded = _load_checkpoint(ckpt)
    if model_config is not None:
        _check_same_architecture(loaded, model_config)
    return loaded


def _load_checkpoint(ckpt: Path) -> LoadedModel:
    meta = read_checkpoint_meta(ckpt)
    cfg = validate_model_config(meta.get("model_config"), str(ckpt / CHECKPOINT_META))
    heads = Heads(**meta.get("heads", {}))
    model = _build(cfg, heads)
    state = strip_prefixes(read_tensors(ckpt / CHECKPOINT_WEIGHTS))
    _load_strict(model, state, ckpt / CHECKPOINT_WEIGHTS)
    return LoadedModel(model.eval(), cfg, heads, "checkpoint", str(ckpt), step=meta.get("step"),
                       original=meta.get(ORIGINAL_LAYOUT_KEY))


def _load_export(folder: Path) -> LoadedModel:
    config = read_json(folder / OPEN_CLIP_CONFIG)
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise UserError(f"{folder / OPEN_CLIP_CONFIG}: no \"model_cfg\"; not an open_clip model directory")
    source = str(folder / OPEN_CLIP_CONFIG)
    cfg = model_config_from(config, source)
    heads_meta = read_json(folder / HEADS_META) if (folder / HEADS_META).is_file() else {}
    heads = Heads(**heads_meta.get("heads", {}))
    model = _build(cfg, heads)
    loaded = LoadedModel(model, cfg, heads, "export", str(folder), step=heads_meta.get("step"),
                         original=original_layout(config, source) or heads_meta.get(ORIGINAL_LAYOUT_KEY))
    if is_stock(config):  # any open_clip model directory, or `export --stock-vocab`
        load_open_clip_weights(model.tower, folder / OPEN_CLIP_WEIGHTS)  # extends the vocabulary
        return _eval(loaded)
    state = {f"tower.{k}": v for k, v in read_tensors(folder / OPEN_CLIP_WEIGHTS).items()}
    if (folder / HEADS_WEIGHTS).is_file():
        state.update(read_tensors(folder / HEADS_WEIGHTS))
    _load_strict(model, state, folder)
    return _eval(loaded)


def _eval(loaded: LoadedModel) -> LoadedModel:
    loaded.model.eval()
    return loaded


def _load_open_clip_file(path: Path, model_config: str | None) -> LoadedModel:
    from mmpretrain.models.model_config import load_model_config
    from mmpretrain.models.weights import load_open_clip_weights

    if model_config is None:
        raise UserError(f"checkpoint {path}: an open_clip weights file needs its architecture; add --model "
                        f"NAME (a shipped model name, a .json file, or an open_clip model name such as ViT-B-32)")
    cfg = load_model_config(model_config)
    model = _build(cfg, Heads())
    report = load_open_clip_weights(model.tower, path)
    loaded = LoadedModel(model.eval(), cfg, Heads(), "open_clip", str(path), original=remembered_layout(model_config))
    if report.extended_vocab:
        loaded.notes.append(f"token embedding extended from {report.extended_vocab[0]} to "
                            f"{report.extended_vocab[1]} rows (<mask>, <sep>)")
    if report.ignored:
        loaded.notes.append(f"ignored {len(report.ignored)} head tensors of the file")
    return loaded


def _build(cfg: dict[str, Any], heads: Heads):
    from mmpretrain.models.multitask import build_model

    return build_model(cfg, heads=heads)


def _check_same_architecture(loaded: LoadedModel, name: str) -> None:
    from mmpretrain.models.model_config import load_model_config

    if load_model_config(name) != loaded.model_config:
        raise UserError(f"--model {name} differs from the architecture stored in {loaded.path}; "
                        "leave --model out (it is only needed for open_clip weights files)")


def _load_strict(model, state: dict, where: Path) -> None:
    problem = mismatch(state, shapes_of(model.state_dict()))
    if problem:
        raise UserError(f"{where}: weights do not match the stored architecture: {problem}; the folder was "
                        "written for another model; use its own checkpoint.json/open_clip_config.json")
    model.load_state_dict(state, strict=True)
