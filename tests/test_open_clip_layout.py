"""The user's own open_clip layout is remembered and written back: a run trained from an
open_clip_config.json keeps it in checkpoint.json, `export --stock-vocab` writes exactly that
model_cfg/preprocess_cfg with 49408-row weights, and open_clip loads the result strictly (by name
and through `local-dir:`) with features equal to ours (1e-6) for texts without <mask>/<sep>."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from helpers import CONFIG, ROOT, train_overrides
from safetensors.torch import save_file

from mmpretrain.checkpoint.load import load_model
from mmpretrain.cli import main
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.errors import UserError
from mmpretrain.models import build_model, load_model_config
from mmpretrain.models.export import export_model
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import ORIGINAL_LAYOUT_KEY, original_layout, remembered_layout

TEXTS = ["a red circle", "two blue squares on the left"]
PREPROCESS = {"size": 64, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}


def _user_model_cfg() -> dict:
    """Our tiny architecture as an open_clip user writes it: stock text layout, "argmax" said aloud."""
    cfg = load_model_config("tiny")
    text = cfg["text_cfg"]
    text["vocab_size"] = 49408
    text["pool_type"] = "argmax"
    del text["eos_id"]
    return cfg


@pytest.fixture
def wrapper(tmp_path):
    """An open_clip model directory's open_clip_config.json, with its own preprocessing."""
    path = tmp_path / "theirs" / "open_clip_config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"model_cfg": _user_model_cfg(), "preprocess_cfg": PREPROCESS}))
    return path


def _features(model, images, texts):
    """(image, text) features of an open_clip CLIP or our MultitaskModel, normalised."""
    with torch.no_grad():
        if isinstance(model, open_clip.model.CLIP):
            tokens = open_clip.tokenize(texts, context_length=32)
            return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        ids = Tokenizer(context_length=32).encode(texts)
        return model.encode_image(images), model.encode_text(ids.ids, ids.eot_index)


def _assert_same_features(theirs, ours):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_features(theirs.eval(), images, TEXTS), _features(ours.eval(), images, TEXTS)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_original_layout_is_what_the_user_wrote(wrapper):
    raw = json.loads(wrapper.read_text())
    layout = original_layout(raw, str(wrapper))
    assert layout == {"source": str(wrapper), "model_cfg": _user_model_cfg(), "preprocess_cfg": PREPROCESS}
    assert load_model_config(str(wrapper)) == load_model_config("tiny")
    assert remembered_layout(str(wrapper)) == layout
    assert remembered_layout("tiny") is None  # ours: nothing to go back to
    assert remembered_layout("RN50")["model_cfg"]["vision_cfg"]["layers"] == [3, 4, 6, 3]  # open_clip's own


def test_run_from_open_clip_config_json_exports_back_to_it(wrapper, tmp_path, shards):
    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 2, "model.name": str(wrapper)})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 0
    run = tmp_path / "run"
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    remembered = json.loads((ckpt / "checkpoint.json").read_text())[ORIGINAL_LAYOUT_KEY]
    assert remembered["model_cfg"] == _user_model_cfg() and remembered["preprocess_cfg"] == PREPROCESS

    # the default export keeps our layout (and the heads) and notes the original ...
    ours_dir = tmp_path / "ours"
    assert main(["export", "--checkpoint", str(run), "--out", str(ours_dir)]) == 0
    assert json.loads((ours_dir / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["vocab_size"] == 49410
    # ... so that exporting the export with --stock-vocab still returns to the user's files
    back = tmp_path / "back"
    assert main(["export", "--checkpoint", str(ours_dir), "--out", str(back), "--stock-vocab"]) == 0
    assert json.loads((back / "open_clip_config.json").read_text()) == json.loads(wrapper.read_text())
    assert not (back / "mmpretrain_heads.safetensors").exists()

    ours = load_model(run).model
    theirs = open_clip.create_model_and_transforms(f"local-dir:{back}")[0]  # strict, their preprocess
    _assert_same_features(theirs, ours)
    # the user's model directory itself, given the exported weights, loads strictly too
    (wrapper.parent / "open_clip_model.safetensors").write_bytes((back / "open_clip_model.safetensors").read_bytes())
    _assert_same_features(open_clip.create_model_and_transforms(f"local-dir:{wrapper.parent}")[0], ours)


def test_open_clip_weights_with_wrapper_as_model_export_back(wrapper, tmp_path):
    open_clip_cfg = _user_model_cfg()
    torch.manual_seed(4)
    stock = open_clip.model.CLIP(**open_clip_cfg).eval()  # 49408 token rows, argmax pooling
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(weights))
    loaded = load_model(weights, str(wrapper))
    assert loaded.original["model_cfg"] == open_clip_cfg
    _assert_same_features(stock, loaded.model)  # extended in memory, same features

    back = tmp_path / "back"
    assert main(["export", "--checkpoint", str(weights), "--model", str(wrapper), "--out", str(back),
                 "--stock-vocab"]) == 0
    written = json.loads((back / "open_clip_config.json").read_text())
    assert written == {"model_cfg": open_clip_cfg, "preprocess_cfg": PREPROCESS}
    again = open_clip.model.CLIP(**open_clip_cfg)
    open_clip.load_checkpoint(again, str(back / "open_clip_model.safetensors"), strict=True)
    for key, value in stock.state_dict().items():  # the very tensors it started from
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_stock_vocab_refuses_an_original_that_is_not_clip_bpe(tmp_path):
    model = build_model(load_model_config("tiny"), heads=Heads())
    siglip = {"source": "open_clip:ViT-B-16-SigLIP", "model_cfg": {"text_cfg": {"vocab_size": 32000}}}
    with pytest.raises(UserError, match="vocabulary has 32000 tokens, not CLIP's 49408; export without --stock-vocab"):
        export_model(model, load_model_config("tiny"), Heads(), tmp_path / "x", stock_vocab=True, original=siglip)
    other = {"source": "elsewhere.json", "model_cfg": {**_user_model_cfg(), "embed_dim": 48}}
    with pytest.raises(UserError, match="is not the architecture of these weights"):
        export_model(model, load_model_config("tiny"), Heads(), tmp_path / "x", stock_vocab=True, original=other)
    assert not (tmp_path / "x").exists()
