"""Meeting open_clip users where they are: stock model configs (vocab_size 49408, argmax pooling) and
open_clip_config.json files are accepted wherever a model is named, extended in memory, and exported
back to the stock layout on request; open_clip_train's epoch_N.pt checkpoints continue here."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch
from helpers import CONFIG, ROOT, train_overrides
from safetensors.torch import save_file

from mmpretrain.checkpoint.load import load_model
from mmpretrain.cli import main
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.errors import UserError
from mmpretrain.models import load_model_config
from mmpretrain.models.heads import Heads


def _stock_config() -> dict:
    """Our tiny architecture written as an open_clip user's JSON: the stock text layout."""
    cfg = load_model_config("tiny")
    text = cfg["text_cfg"]
    text["vocab_size"] = 49408
    del text["pool_type"], text["eos_id"]
    return cfg


@pytest.fixture
def stock(tmp_path):
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(_stock_config()))
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": _stock_config(), "preprocess_cfg": {"size": 64}}))
    return path, wrapped


def test_stock_configs_are_extended_in_memory_and_say_so(stock, caplog):
    path, wrapped = stock
    with caplog.at_level(logging.WARNING, logger="mmpretrain.models.model_config"):
        cfg = load_model_config(str(path))
    assert cfg == load_model_config("tiny")  # exactly our layout: 49410 rows, end-of-text pooling
    assert "vocab_size 49408); extended to 49410" in caplog.text and str(path) in caplog.text
    assert load_model_config(str(wrapped)) == cfg
    other = json.loads(path.read_text())
    other["text_cfg"]["vocab_size"] = 32000
    path.write_text(json.dumps(other))
    with pytest.raises(UserError, match="text_cfg.vocab_size = 32000: must be 49410"):
        load_model_config(str(path))


def _stock_open_clip_model(path, seed=0):
    open_clip.add_model_config(str(path))  # registers the file under its stem, as open_clip users do
    torch.manual_seed(seed)
    return open_clip.create_model(path.stem).eval()


def test_train_eval_export_take_stock_configs_and_export_back(stock, tmp_path, shards):
    path, wrapped = stock
    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 2, "model.name": str(path)})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 0
    run = tmp_path / "run"
    # open_clip weights of the stock model (49408 rows) evaluate with the wrapper file as --model
    reference = _stock_open_clip_model(path)
    weights = tmp_path / "stock.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", "--checkpoint", str(weights), "--model", str(wrapped), "--shards", images,
                 "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    assert "extended from 49408 to 49410" in " ".join(json.loads(out.read_text())["notes"])

    # export back to the stock layout: open_clip loads it strictly with the user's own config
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(export), "--stock-vocab"]) == 0
    written = json.loads((export / "open_clip_config.json").read_text())["model_cfg"]
    assert written == _stock_config()
    theirs = open_clip.create_model(path.stem, pretrained=str(export / "open_clip_model.safetensors")).eval()
    ours = load_model(run).model
    tokens = open_clip.get_tokenizer(path.stem)(["a red circle", "two blue squares on the left"])
    ids = Tokenizer(context_length=32).encode(["a red circle", "two blue squares on the left"])
    assert torch.equal(tokens[:, :32], ids.ids)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(x, normalize=True), ours.encode_image(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs.encode_text(tokens[:, :32], normalize=True), ours.encode_text(ids.ids, ids.eot_index),
                                   atol=1e-6, rtol=0)
    # and the stock export loads here again (extended in memory, no text heads in it)
    again = load_model(export)
    assert again.heads == Heads() and again.model_config == load_model_config("tiny")
    with torch.no_grad():
        torch.testing.assert_close(again.model.encode_image(x), ours.encode_image(x), atol=0, rtol=0)
