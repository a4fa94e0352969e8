"""Meeting open_clip users where they are: stock model configs (vocab_size 49408, argmax pooling) and
open_clip_config.json files are accepted wherever a model is named, extended in memory, and exported
back to the stock layout on request; open_clip_train's epoch_N.pt checkpoints continue here."""

from __future__ import annotations

import json
import logging
import zlib

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
    assert "has vocab_size 49408; extended to 49410" in caplog.text and str(path) in caplog.text
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


# -- continuing an open_clip_train run ------------------------------------------------------------
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.98), 1e-6, 0.1


def _open_clip_train_optimizer(model):
    """open_clip_train/main.py's AdamW, its grouping restated: [gain/bias (no decay), rest]."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": WD}],
                             lr=LR, betas=BETAS, eps=EPS)


def _grads(model, step):
    """The same pseudo-gradient for every parameter of a name, whatever model holds it."""
    for name, p in model.named_parameters():
        name = name.removeprefix("tower.")
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))
        rows = min(p.shape[0], 49408) if name == "token_embedding.weight" else None
        g = torch.randn(p.shape, generator=gen) * 1e-2
        if rows is not None:
            g[rows:] = 0
        p.grad = g


@pytest.fixture
def epoch_file(stock, tmp_path):
    path, _ = stock
    reference = _stock_open_clip_model(path, seed=3).train()
    opt = _open_clip_train_optimizer(reference)
    for step in range(2):
        _grads(reference, step)
        opt.step()
    ckpt = tmp_path / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "their-run", "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
                "optimizer": opt.state_dict()}, ckpt)
    return ckpt, reference, opt


def test_open_clip_train_checkpoint_continues_by_parameter_name(stock, epoch_file):
    from mmpretrain.config import OptimConfig
    from mmpretrain.models import build_model
    from mmpretrain.train.open_clip_train import continue_open_clip_train
    from mmpretrain.train.optim import build_optimizer

    path, _ = stock
    ckpt, reference, ref_opt = epoch_file
    model = build_model(load_model_config(str(path)), heads=Heads(mlm=True, ar=False))
    opt = build_optimizer(model, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                                             grad_clip=None))
    step, notes = continue_open_clip_train(ckpt, model, opt)
    assert step == 2 and "epoch 2, 2 optimizer steps" in notes[0] and "fresh AdamW state (mlm_head)" in notes[-1]
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        mine = ours[f"tower.{name}"]
        torch.testing.assert_close(_rows_of(mine.detach(), p), p.detach(), atol=0, rtol=0, msg=name)
        want, got = ref_opt.state[p], opt.state[mine]
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(_rows_of(got[field], p), want[field], atol=0, rtol=0, msg=f"{name} {field}")
        assert float(got["step"]) == 2.0
    # one more step of each from the same gradients: the same parameters
    _grads(reference, 2)
    _grads(model, 2)
    ref_opt.step()
    opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(_rows_of(ours[f"tower.{name}"].detach(), p), p.detach(), atol=1e-6, rtol=0, msg=name)


def _rows_of(ours, theirs):
    """Our tensor cut to theirs: the token embedding has two more rows here (<mask>, <sep>)."""
    return ours[:theirs.shape[0]] if theirs.dim() else ours


def test_train_resume_takes_an_epoch_file_and_says_what_carried_over(stock, epoch_file, shards, tmp_path, capsys):
    path, _ = stock
    ckpt, _, _ = epoch_file
    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 4, "model.name": str(path),
                                                      "train.resume": str(ckpt), "train.checkpoint_every": 4})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 0
    err = capsys.readouterr().out
    assert "continued open_clip_train epoch_2.pt (epoch 2, 2 optimizer steps)" in err
    assert "not carried over: its lr/schedule/weight decay" in err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 4]  # two more steps, counted from 2
    assert load_model(tmp_path / "run").step == 4
    # a file without optimizer state is one line pointing at model.pretrained
    bare = tmp_path / "weights_only.pt"
    torch.save({"state_dict": torch.load(ckpt, weights_only=True)["state_dict"]}, bare)
    args = train_overrides(tmp_path / "b", images, text, **{"model.name": str(path), "train.resume": str(bare)})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no optimizer state" in err and "model.pretrained=" in err


def test_an_epoch_file_of_another_grouping_is_one_line(stock, epoch_file, tmp_path):
    """An optimizer split otherwise than open_clip_train's default AdamW (same total) is refused in one
    line, not mapped onto the wrong parameters."""
    from mmpretrain.config import OptimConfig
    from mmpretrain.models import build_model
    from mmpretrain.train.open_clip_train import continue_open_clip_train
    from mmpretrain.train.optim import build_optimizer

    path, _ = stock
    ckpt, _, _ = epoch_file
    saved = torch.load(ckpt, weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    groups[1]["params"].insert(0, groups[0]["params"].pop())  # one parameter moved to the decay group
    other = tmp_path / "epoch_9.pt"
    torch.save(saved, other)
    model = build_model(load_model_config(str(path)), heads=Heads())
    opt = build_optimizer(model, OptimConfig())
    with pytest.raises(UserError) as info:
        continue_open_clip_train(other, model, opt)
    message = str(info.value)
    assert "\n" not in message and "its AdamW groups hold" in message and "model.pretrained" in message
    assert not opt.state  # nothing was half loaded into the optimizer
