"""Export a model to open_clip's `local-dir:` layout, text heads and tokenizer details beside it.

`open_clip.create_model_and_transforms("local-dir:DIR")` loads the dual tower from the two open_clip
files and ignores ours; `mmpretrain.checkpoint.load.load_model(DIR)` loads all of it. The directory
is assembled under a temporary name and renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mmpretrain
from mmpretrain.errors import UserError
from mmpretrain.fileio import atomic_dir, writing
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import (
    ORIGINAL_LAYOUT_KEY,
    STOCK_VOCAB_SIZE,
    TEXT_VOCAB_SIZE,
    image_size,
    layout_fits,
    layout_vocab_size,
    stock_layout,
)

# The export layout: open_clip reads the first two files (`local-dir:`), we read all of them.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HEADS_WEIGHTS = "mmpretrain_heads.safetensors"
HEADS_META = "mmpretrain_heads.json"
TOKENIZER_META = "mmpretrain_tokenizer.json"


def preprocess_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """open_clip's PreprocessCfg for evaluation: the model's size, CLIP's mean/std (what we train with)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {"size": image_size(model_config), "mode": "RGB", "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest",
            "fill_color": 0}


def tokenizer_details(context_length: int) -> dict[str, Any]:
    from mmpretrain.data.text.tokenizer import Tokenizer

    tok = Tokenizer(context_length=context_length)
    return {
        "tokenizer": "open_clip SimpleTokenizer (CLIP BPE) with additional special tokens",
        "additional_special_tokens": ["<mask>", "<sep>"],
        "vocab_size": tok.vocab_size,
        "special_ids": {"<start_of_text>": tok.sot_id, "<end_of_text>": tok.eot_id, "<mask>": tok.mask_id,
                        "<sep>": tok.sep_id},
        "pad_id": tok.pad_id,
        "context_length": context_length,
        "pooling": "the text embedding is taken at the <end_of_text> position",
    }


def export_model(model, model_config: dict[str, Any], heads: Heads, out: str | Path, *,
                 overwrite: bool = False, provenance: dict[str, Any] | None = None,
                 stock_vocab: bool = False, original: dict[str, Any] | None = None) -> Path:
    """Write `model` (a MultitaskModel) to `out`; returns the directory.

    Default: mmpretrain's layout (49410 rows, end-of-text pooling) with the text heads; `original`
    (model_config.original_layout), when given, is noted in mmpretrain_heads.json so that a later
    export of this directory can still return to it.
    `stock_vocab`: the layout the model came from (`original`; None: open_clip's stock CLIP layout),
    which open_clip loads strictly with the user's own config (`open_clip.create_model(NAME,
    pretrained=...)`): the <mask>/<sep> rows are dropped, and with them the text heads, whose
    decoders are those rows."""
    from safetensors.torch import save_file

    layout = _layout_to_write(model_config, original) if stock_vocab else None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"export {out}: exists and is not empty; choose another --out or pass --overwrite")
    tower = model.export_state_dict()
    head_state = {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}
    config = {"model_cfg": model_config, "preprocess_cfg": preprocess_config(model_config)}
    if layout is not None:
        tower = _original_rows(tower, layout_vocab_size(layout))
        head_state, heads = {}, Heads()
        config = {"model_cfg": layout["model_cfg"], "preprocess_cfg": layout.get("preprocess_cfg") or config["preprocess_cfg"]}
    meta = {"heads": vars(heads).copy(), "mmpretrain_version": mmpretrain.__version__, "stock_vocab": stock_vocab,
            **(provenance or {})}
    if original is not None:
        meta[ORIGINAL_LAYOUT_KEY] = original
    # a full disk is one line naming the export; atomic_dir removes what was half written
    with writing(out, "free space and rerun the same command"), atomic_dir(out) as tmp:
        _write_json(tmp / OPEN_CLIP_CONFIG, config)
        save_file(_contiguous(tower), str(tmp / OPEN_CLIP_WEIGHTS))
        if head_state:
            save_file(_contiguous(head_state), str(tmp / HEADS_WEIGHTS))
        _write_json(tmp / HEADS_META, meta)
        if layout is None:  # the original layout has no <mask>/<sep> to describe
            _write_json(tmp / TOKENIZER_META, tokenizer_details(model_config["text_cfg"].get("context_length", 77)))
    return out


def _layout_to_write(model_config: dict[str, Any], original: dict[str, Any] | None) -> dict[str, Any]:
    layout = original if original is not None else stock_layout(model_config)
    size = layout_vocab_size(layout)
    if size != STOCK_VOCAB_SIZE:
        raise UserError(f"export --stock-vocab: the model came from {layout['source']}, whose vocabulary has "
                        f"{size} tokens, not CLIP's {STOCK_VOCAB_SIZE}; export without --stock-vocab")
    if not layout_fits(layout, model_config):
        raise UserError(f"export --stock-vocab: the remembered original ({layout['source']}) is not the "
                        "architecture of these weights; export without --stock-vocab")
    return layout


def _original_rows(tower: dict, vocab_size: int) -> dict:
    """The tower's vocabulary-shaped tensors cut back to the original vocabulary (its first rows: the
    added tokens were appended, see weights.with_vocab_rows)."""
    return {k: v[:vocab_size] if v.ndim and v.shape[0] == TEXT_VOCAB_SIZE else v for k, v in tower.items()}


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
