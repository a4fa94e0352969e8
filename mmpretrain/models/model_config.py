"""Architecture files: open_clip's model-config schema (embed_dim, vision_cfg, text_cfg), validated.

A model is named by a JSON file path (an open_clip model JSON, or the `open_clip_config.json` of an
open_clip model directory, whose "model_cfg" is the model), by a file in
`mmpretrain/models/model_configs/` (`tiny`, `ViT-B-32`, ...), or by one of open_clip's built-in
names (`ViT-L-14`, `convnext_base`, ...). Our text trunk needs three things open_clip's own configs
do not say, so stock configs (vocab_size 49408, argmax pooling) are adapted in memory and the change
logged: the vocabulary holds `<mask>` and `<sep>` (49410 rows), and text is pooled at the end-of-text
token ("eos" pooling with id 49407). For texts without the two added tokens this computes exactly
what the stock config does (49407 is the largest id, so argmax finds the same position). The
original layout is remembered (`original_layout`; checkpoints keep it) and `mmpretrain export
--stock-vocab` writes it back. Other vocabularies in a file are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from mmpretrain.errors import UserError

log = logging.getLogger(__name__)

# Fixed by mmpretrain.data.text.tokenizer (it asserts them): CLIP BPE 49408 + <mask> + <sep>.
TEXT_VOCAB_SIZE = 49410
STOCK_VOCAB_SIZE = 49408  # open_clip's CLIP BPE configs
EOT_ID = 49407
ORIGINAL_LAYOUT_KEY = "original_layout"  # where checkpoint.json / mmpretrain_heads.json keep it

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"  # package data: in every install, editable or not

# Top-level keys of open_clip's schema that build a CLIP with open_clip's own text transformer.
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale", "custom_text"}


def shipped_configs() -> list[str]:
    """Names of the architecture files in mmpretrain/models/model_configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# The original layout of every stock config this process loaded, by the name it was loaded under: the
# trainer hands checkpoint_meta only the adapted config and its training config (which holds the
# name), so the checkpoint looks the original up here instead of reading the file again mid-run.
_REMEMBERED: dict[str, dict[str, Any] | None] = {}


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """The validated config dict for a file path (a model JSON or an open_clip_config.json), a shipped
    name, or an open_clip built-in name; stock layouts are adapted (one warning line)."""
    raw, source, builtin = _read_config(name_or_path)
    _REMEMBERED[name_or_path] = original_layout(raw, source, builtin=builtin)
    if builtin:  # open_clip's own names are always adapted, as before stock files were accepted
        return validate_model_config(adapt_open_clip_config(raw, source), source)
    return model_config_from(raw, source)


def remembered_layout(name_or_path: str) -> dict[str, Any] | None:
    """The original layout behind `load_model_config(name_or_path)` (None: mmpretrain's layout as is)."""
    if name_or_path not in _REMEMBERED:
        load_model_config(name_or_path)
    return copy.deepcopy(_REMEMBERED[name_or_path])


def _read_config(name_or_path: str) -> tuple[Any, str, bool]:
    """(the config as written, where it came from, whether it is an open_clip built-in)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"model config {name_or_path}: no such file (give a .json path or one of "
                            f"{', '.join(shipped_configs())})")
        return _read_json(path), str(path), False
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return _read_json(shipped), str(shipped), False
    from open_clip.factory import get_model_config  # only here: importing open_clip takes ~25 s

    builtin = get_model_config(name_or_path)
    if builtin is None:
        raise UserError(f"model config {name_or_path!r}: not a file, not in {CONFIG_DIR} "
                        f"({', '.join(shipped_configs())}) and not an open_clip model name")
    return builtin, f"open_clip:{name_or_path}", True


def model_config_from(cfg: Any, source: str) -> dict[str, Any]:
    """A config read from anywhere (a file, an export's open_clip_config.json): unwrapped, a stock text
    layout adapted (one warning line), validated."""
    model = _unwrap(cfg)
    return validate_model_config(adapt_open_clip_config(model, source) if is_stock(model) else model, source)


def is_stock(cfg: Any) -> bool:
    """Whether a config (or open_clip_config.json) has open_clip's stock text layout: the CLIP BPE
    vocabulary (49408) and argmax pooling."""
    text = _unwrap(cfg).get("text_cfg") if isinstance(cfg, dict) else None
    return isinstance(text, dict) and (text.get("vocab_size", STOCK_VOCAB_SIZE) == STOCK_VOCAB_SIZE
                                       and text.get("pool_type", "argmax") == "argmax" and "eos_id" not in text)


def original_layout(raw: Any, source: str, *, builtin: bool = False) -> dict[str, Any] | None:
    """What a checkpoint remembers of a config we adapt, so that `export --stock-vocab` can write
    it back: {"source", "model_cfg" as written, "preprocess_cfg" when an open_clip_config.json had one}.
    None for configs in mmpretrain's layout, which are used as they are."""
    model = _unwrap(raw)
    if not (builtin or is_stock(model)):
        return None
    layout = {"source": source, "model_cfg": copy.deepcopy(model)}
    if model is not raw and isinstance(raw.get("preprocess_cfg"), dict):
        layout["preprocess_cfg"] = copy.deepcopy(raw["preprocess_cfg"])
    return layout


def stock_layout(cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's stock text layout of one of our configs (vocab_size 49408, default argmax pooling):
    the original of a model built from mmpretrain's own configs, which came from open_clip's."""
    cfg = copy.deepcopy(cfg)
    text = cfg["text_cfg"]
    text["vocab_size"] = STOCK_VOCAB_SIZE
    text.pop("pool_type", None)
    text.pop("eos_id", None)
    return {"source": "open_clip's stock CLIP text layout", "model_cfg": cfg}


def layout_vocab_size(layout: dict[str, Any]) -> int:
    return int(layout["model_cfg"].get("text_cfg", {}).get("vocab_size", STOCK_VOCAB_SIZE))


def layout_fits(layout: Any, cfg: dict[str, Any]) -> bool:
    """Whether `layout` (a remembered original) adapts to exactly the config `cfg` (nothing logged)."""
    try:
        model = layout["model_cfg"]
        return validate_model_config(_adapted(model)[0] if is_stock(model) else model, "") == cfg
    except (UserError, KeyError, TypeError, AttributeError):
        return False


def adapt_open_clip_config(cfg: dict[str, Any], source: str = "open_clip config") -> dict[str, Any]:
    """An open_clip config with our vocabulary size and end-of-text pooling; the change is one warning."""
    adapted, changed = _adapted(cfg)
    if changed:
        had = cfg.get("text_cfg", {}).get("vocab_size", STOCK_VOCAB_SIZE)
        log.warning("mmpretrain: %s has vocab_size %s; extended to %s for <mask>/<sep> in memory, pooled at "
                    "end-of-text (text_cfg %s; `mmpretrain export --stock-vocab` writes the original back)",
                    source, had, TEXT_VOCAB_SIZE, changed)
    return adapted


def _adapted(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    # End-of-text pooling: argmax pooling would pick <mask>/<sep> (ids 49408, 49409 > 49407); for
    # texts without them both pool at the same position, so features equal the stock model's.
    cfg = copy.deepcopy(cfg)
    text = cfg.setdefault("text_cfg", {})
    changed = {k: v for k, v in (("vocab_size", TEXT_VOCAB_SIZE), ("pool_type", "eos"), ("eos_id", EOT_ID))
               if text.get(k) != v}
    text.update(changed)
    return cfg, changed


def _unwrap(cfg: Any) -> Any:
    """The model of an open_clip model directory's open_clip_config.json ({"model_cfg", "preprocess_cfg"})."""
    if isinstance(cfg, dict) and "model_cfg" in cfg and "embed_dim" not in cfg:
        return cfg["model_cfg"]
    return cfg


def validate_model_config(cfg: Any, source: str) -> dict[str, Any]:
    """Check keys and types against open_clip's dataclasses; every error names the dotted key."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if not isinstance(cfg, dict):
        raise UserError(f"model config {source}: expected a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _TOP_LEVEL)
    if unknown:
        raise UserError(f"model config {source}: unknown key {unknown[0]!r} (mmpretrain builds open_clip's "
                        f"CLIP: {', '.join(sorted(_TOP_LEVEL))})")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise UserError(f"model config {source}: missing {key!r}")
    if not isinstance(cfg["embed_dim"], int) or cfg["embed_dim"] <= 0:
        raise UserError(f"model config {source}: embed_dim must be a positive integer, got {cfg['embed_dim']!r}")
    _check_fields(cfg["vision_cfg"], CLIPVisionCfg, f"{source}: vision_cfg")
    _check_fields(cfg["text_cfg"], CLIPTextCfg, f"{source}: text_cfg")
    _check_text(cfg["text_cfg"], source)
    return copy.deepcopy(cfg)


def _check_fields(section: Any, schema: type, where: str) -> None:
    if not isinstance(section, dict):
        raise UserError(f"model config {where}: expected an object, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in section.items():
        if key not in fields:
            raise UserError(f"model config {where}.{key}: unknown key (open_clip's {schema.__name__} has "
                            f"{', '.join(sorted(fields))})")
        if key in ("layers", "image_size"):  # an int, or a list ([h, w] images, ResNet stage depths)
            items = value if isinstance(value, list) and value else [value]
            if not all(_has_type(v, int) for v in items):
                raise UserError(f"model config {where}.{key} = {value!r}: expected an integer or a list of integers")
            continue
        expected = _expected_type(fields[key].default)
        if expected is not None and value is not None and not _has_type(value, expected):  # null = unset
            raise UserError(f"model config {where}.{key} = {value!r}: expected {expected.__name__}")


def _expected_type(default: Any) -> type | None:
    if default is None or default is dataclasses.MISSING:
        return None
    return type(default) if isinstance(default, (bool, int, float, str)) else None


def _has_type(value: Any, expected: type) -> bool:
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _check_text(text: dict[str, Any], source: str) -> None:
    def bad(key: str, why: str):
        raise UserError(f"model config {source}: text_cfg.{key} = {text.get(key)!r}: {why}")

    if text.get("hf_model_name"):
        bad("hf_model_name", "the text trunk is open_clip's TextTransformer; Hugging Face text towers are not supported")
    if text.get("embed_cls"):
        bad("embed_cls", "the text trunk pools at end-of-text; a CLS embedding is not supported")
    if text.get("no_causal_mask"):
        bad("no_causal_mask", "the trunk picks causal or bidirectional attention per branch; remove this key")
    if text.get("vocab_size", STOCK_VOCAB_SIZE) != TEXT_VOCAB_SIZE:
        bad("vocab_size", f"must be {TEXT_VOCAB_SIZE} (CLIP BPE + <mask> + <sep>) or the stock {STOCK_VOCAB_SIZE} "
                          "with default pooling (adapted in memory)")
    if text.get("pool_type", "argmax") != "eos" or text.get("eos_id", 2) != EOT_ID:
        bad("pool_type", f'set "pool_type": "eos" and "eos_id": {EOT_ID} (argmax pooling breaks once '
                         f"<mask>/<sep> ids appear)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"model config {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"model config {path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def image_size(model_config: dict[str, Any]) -> int:
    size = model_config["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
