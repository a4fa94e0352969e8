"""The dual tower, the text trunk's two attention modes, tied heads, weight loading, LiT, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.data.text.masking import IGNORE_INDEX, MaskingConfig
from mmpretrain.data.text.objectives import text_batch
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.errors import UserError
from mmpretrain.losses import clip_loss, siglip_loss, token_loss
from mmpretrain.models import (
    TowerOptions,
    build_model,
    load_model_config,
    load_open_clip_weights,
    shipped_configs,
)
from mmpretrain.models.model_config import CONFIG_DIR
from mmpretrain.models.text_trunk import text_hidden

TEXTS = ["A red circle sits on a blue square. It looks calm.", "Two small stars. They shine brightly at night.",
         "A green triangle beside a ring.", "Three hearts drawn in a row on white paper."]


def _model(options: TowerOptions = TowerOptions(), seed: int = 0, **heads):
    torch.manual_seed(seed)
    return build_model(load_model_config("tiny"), options, **heads)


def _inputs(cfg, batch: int = 4, seed: int = 0):
    size = cfg["vision_cfg"]["image_size"]
    tokenizer = Tokenizer(context_length=cfg["text_cfg"]["context_length"])
    tokens = tokenizer.encode(TEXTS[:batch])
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    text = text_batch(TEXTS[:batch], tokenizer, MaskingConfig(probability=0.3),
                      torch.Generator().manual_seed(seed), pair_objective="sop")
    return images, tokens, text


def _all_losses(out) -> torch.Tensor:
    loss = clip_loss(out.image_features, out.text_features, out.logit_scale)["loss"]
    if out.logit_bias is not None:
        loss = loss + siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)["loss"]
    mlm, ar, pair = out.text["mlm"], out.text["ar"], out.text["pair"]
    loss = loss + token_loss(mlm.hidden, mlm.decoder_weight, mlm.labels, bias=mlm.bias)["loss"]
    loss = loss + token_loss(ar.hidden, ar.decoder_weight, ar.labels, chunk_size=16)["loss"]
    return loss + F.cross_entropy(pair.logits, pair.labels)


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_trains_every_parameter(name):
    assert {"tiny", "tiny-timm", "ViT-B-32", "ViT-B-16"} <= set(shipped_configs())
    cfg = load_model_config(name)
    torch.manual_seed(0)
    model = build_model(cfg, sentence_pair=True).train()
    images, tokens, text = _inputs(cfg, batch=2)
    out = model(images=images, tokens=tokens.ids, eot_index=tokens.eot_index, text=text)
    assert out.image_features.shape == out.text_features.shape == (2, cfg["embed_dim"])
    loss = _all_losses(out)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []


def test_siglip_bias_gets_a_gradient():
    model = _model(TowerOptions(init_logit_bias=-10.0), sentence_pair=True)
    images, tokens, text = _inputs(load_model_config("tiny"))
    out = model(images=images, tokens=tokens.ids, eot_index=tokens.eot_index, text=text)
    assert out.logit_bias.item() == -10.0
    _all_losses(out).backward()
    assert model.tower.logit_bias.grad is not None and float(model.tower.logit_bias.grad) != 0.0


@pytest.mark.parametrize("train_mode", [True, False])
def test_causal_mode_later_tokens_do_not_change_earlier_outputs(train_mode):
    model = _model().train(train_mode)
    ids = torch.randint(0, 49406, (3, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 49406, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(train_mode):
        a = text_hidden(model.tower, ids, causal=True)
        b = text_hidden(model.tower, changed, causal=True)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the change is visible where it may be


@pytest.mark.parametrize("train_mode", [True, False])
def test_bidirectional_mode_ignores_padding_and_sees_later_tokens(train_mode):
    model = _model().train(train_mode)
    lengths = torch.tensor([5, 9, 14])
    mask = torch.arange(16)[None, :] < lengths[:, None]  # (B, L)
    ids = torch.randint(0, 49406, (3, 16), generator=torch.Generator().manual_seed(3))
    other_padding = torch.where(mask, ids, torch.randint(0, 49406, (3, 16), generator=torch.Generator().manual_seed(4)))
    with torch.set_grad_enabled(train_mode):
        a = text_hidden(model.tower, ids, causal=False, attention_mask=mask)
        b = text_hidden(model.tower, other_padding, causal=False, attention_mask=mask)
        later = ids.clone()
        later[:, 4] = 7  # the last real token of row 0, inside rows 1 and 2
        c = text_hidden(model.tower, later, causal=False, attention_mask=mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-6)
    assert (a[:, 0] - c[:, 0]).abs().max() > 1e-3  # position 0 sees position 4: not causal


def test_text_embedding_pools_at_end_of_text_not_argmax():
    model = _model().eval()
    tokenizer = Tokenizer(context_length=32)
    batch = tokenizer.encode(["a red circle", "a blue star on a green background"])
    ids = batch.ids.clone()
    ids[:, 1] = tokenizer.mask_id  # the largest id is now <mask>, not the end-of-text token
    with torch.no_grad():
        features = model.encode_text(ids, batch.eot_index, normalize=False)
        hidden = text_hidden(model.tower, ids, causal=True)
    at_eot = hidden[torch.arange(2), batch.eot_index] @ model.tower.text_projection
    at_argmax = hidden[torch.arange(2), ids.argmax(-1)] @ model.tower.text_projection
    torch.testing.assert_close(features, at_eot)
    assert (features - at_argmax).abs().max() > 1e-3


def test_mlm_head_decodes_only_masked_positions_with_tied_weights():
    model = _model()
    _, _, text = _inputs(load_model_config("tiny"))
    mlm = model(text=text).text["mlm"]
    selected = text.mlm_labels != IGNORE_INDEX
    assert mlm.hidden.shape == (int(selected.sum()), 64)
    torch.testing.assert_close(mlm.labels, text.mlm_labels[selected])
    assert mlm.decoder_weight is model.tower.token_embedding.weight and mlm.bias is model.mlm_head.bias
    hidden = text_hidden(model.tower, text.mlm_input_ids, causal=False, attention_mask=text.attention_mask)
    expected = model.mlm_head(hidden)[selected] @ model.tower.token_embedding.weight.T + model.mlm_head.bias
    decoded = [logits for logits, _ in mlm.logit_chunks(size=5)]  # the prediction owns its decoding, in chunks
    assert len(decoded) == -(-int(selected.sum()) // 5)
    torch.testing.assert_close(torch.cat(decoded), expected)
    assert not any(k.startswith(("mlm_head", "ar_head")) for k in model.tower.state_dict())


def test_ar_loss_trains_the_shared_token_embedding():
    model = _model(mlm=False)
    _, _, text = _inputs(load_model_config("tiny"))
    ar = model(text=text).text["ar"]
    token_loss(ar.hidden, ar.decoder_weight, ar.labels)["loss"].backward()
    assert model.tower.token_embedding.weight.grad.abs().sum() > 0
    assert model.tower.visual.conv1.weight.grad is None  # the text branch never touches the image tower


def test_tower_state_dict_is_open_clips_and_exports_load_in_open_clip(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    model = _model().eval()
    reference = open_clip.model.CLIP(**load_model_config("tiny"))
    ours = model.export_state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    save_file({k: v.contiguous() for k, v in ours.items()}, tmp_path / "weights.safetensors")
    open_clip.add_model_config(CONFIG_DIR)
    loaded = open_clip.create_model("tiny", pretrained=str(tmp_path / "weights.safetensors")).eval()
    images, tokens, _ = _inputs(load_model_config("tiny"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images, normalize=True), model.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(tokens.ids, normalize=True),
                                   model.encode_text(tokens.ids, tokens.eot_index))


def _save(state, path):
    torch.save(state, path)
    return path


def test_load_open_clip_weights_extends_vocab_and_strips_prefixes(tmp_path):
    import open_clip

    cfg = load_model_config("tiny")
    cfg["text_cfg"]["vocab_size"] = 49408  # an open_clip release: no <mask>/<sep> rows
    torch.manual_seed(5)
    source = open_clip.model.CLIP(**cfg).state_dict()
    path = _save({"state_dict": {f"module._orig_mod.{k}": v for k, v in source.items()}, "epoch": 3},
                 tmp_path / "release.pt")
    model = _model(seed=9)
    report = load_open_clip_weights(model.tower, path)
    assert report.extended_vocab == (49408, 49410)
    loaded = model.tower.state_dict()
    for key, value in source.items():
        if key != "token_embedding.weight":
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    embedding = loaded["token_embedding.weight"]
    torch.testing.assert_close(embedding[:49408], source["token_embedding.weight"], rtol=0, atol=0)
    mean = source["token_embedding.weight"].mean(0)
    torch.testing.assert_close(embedding[49408:], mean.expand(2, -1))


def test_load_our_checkpoint_ignores_heads_and_keeps_siglip_bias(tmp_path):
    source = _model(seed=1, sentence_pair=True)
    path = _save(source.state_dict(), tmp_path / "ours.pt")
    model = _model(TowerOptions(init_logit_bias=-10.0), seed=2)
    report = load_open_clip_weights(model.tower, path)
    assert report.kept_from_model == ["logit_bias"] and model.tower.logit_bias.item() == -10.0
    assert any(k.startswith("mlm_head.") for k in report.ignored)
    assert any(k.startswith("pair_head.") for k in report.ignored)
    torch.testing.assert_close(model.tower.visual.proj, source.tower.visual.proj, rtol=0, atol=0)


def test_load_weights_mismatch_is_one_line_listing_keys(tmp_path):
    import open_clip

    cfg = load_model_config("tiny")
    cfg["vision_cfg"]["layers"] = 3
    cfg["text_cfg"]["width"] = 32
    path = _save(open_clip.model.CLIP(**cfg).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError) as err:
        load_open_clip_weights(_model().tower, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "unexpected 12 (visual.transformer.resblocks.2." in message
    assert "shape mismatch" in message and "ln_final.weight (32,) vs (64,)" in message
    with pytest.raises(UserError, match="no such file"):
        load_open_clip_weights(_model().tower, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_open_clip_weights(_model().tower, tmp_path / "junk.pt")


def test_lit_lock_freezes_and_keeps_image_tower_in_eval():
    model = _model(TowerOptions(lock_image=True, patch_dropout=0.5), sentence_pair=True).train()
    assert not model.tower.visual.training and model.tower.transformer.training
    images, tokens, text = _inputs(load_model_config("tiny"))
    _all_losses(model(images=images, tokens=tokens.ids, eot_index=tokens.eot_index, text=text)).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.tower.visual.parameters())
    assert model.tower.text_projection.grad is not None
    partial = _model(TowerOptions(lock_image=True, lock_image_unlocked_groups=1))
    trainable = {n for n, p in partial.tower.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}
    assert partial.train().tower.visual.training  # partly trainable: normal train mode


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _model(TowerOptions(grad_checkpointing=checkpointing), seed=3, sentence_pair=True).train()
        images, tokens, text = _inputs(load_model_config("tiny"))
        _all_losses(model(images=images, tokens=tokens.ids, eot_index=tokens.eot_index, text=text)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert model.tower.transformer.grad_checkpointing and model.tower.visual.transformer.grad_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_patch_dropout_only_in_training():
    plain = _model(seed=4).eval()
    dropped = _model(TowerOptions(patch_dropout=0.5), seed=4)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval().encode_image(images), plain.encode_image(images))
        dropped.train()
        torch.manual_seed(0)
        first = dropped.encode_image(images)
        torch.manual_seed(1)
        second = dropped.encode_image(images)
    assert (first - second).abs().max() > 1e-3


def test_clamp_logit_scale():
    model = _model()
    assert model(images=torch.randn(1, 3, 64, 64)).logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.tower.logit_scale.fill_(7.0)
    model.clamp_logit_scale_()
    assert model.tower.logit_scale.exp().item() == pytest.approx(100.0)


def test_model_config_errors_name_the_key(tmp_path):
    def write(cfg):
        path = tmp_path / "m.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    good = load_model_config("tiny")
    cases = [
        ({**good, "vision_cfg": {**good["vision_cfg"], "widht": 64}}, "vision_cfg.widht: unknown key"),
        ({**good, "text_cfg": {**good["text_cfg"], "layers": "two"}}, "text_cfg.layers"),
        ({**good, "text_cfg": {**good["text_cfg"], "heads": 2.5}}, "text_cfg.heads = 2.5: expected int"),
        ({**good, "text_cfg": {**good["text_cfg"], "vocab_size": 49408}}, "text_cfg.vocab_size = 49408"),
        ({**good, "text_cfg": {**good["text_cfg"], "pool_type": "argmax"}}, "text_cfg.pool_type"),
        ({**good, "multimodal_cfg": {}}, "unknown key 'multimodal_cfg'"),
        ({k: v for k, v in good.items() if k != "embed_dim"}, "missing 'embed_dim'"),
    ]
    for cfg, expected in cases:
        with pytest.raises(UserError, match=expected.replace(".", r"\.")):
            load_model_config(write(cfg))
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        load_model_config(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="not a file, not in"):
        load_model_config("no-such-model")


def test_open_clip_builtin_names_are_adapted_to_our_tokenizer():
    cfg = load_model_config("RN50")
    assert cfg["text_cfg"]["vocab_size"] == 49410 and cfg["text_cfg"]["pool_type"] == "eos"
    assert cfg["text_cfg"]["eos_id"] == 49407 and cfg["vision_cfg"]["layers"] == [3, 4, 6, 3]


def test_sentence_pair_head_without_pair_inputs_is_an_error():
    model = _model(sentence_pair=True)
    tokenizer = Tokenizer(context_length=32)
    text = text_batch(TEXTS, tokenizer, MaskingConfig(), torch.Generator().manual_seed(0))  # no pair_objective
    with pytest.raises(ValueError, match="sentence-pair head needs pair inputs"):
        model(text=text)


def test_ar_on_the_captions_reuses_the_contrastive_pass():
    """A text batch made from the captions (no text shards): the causal trunk runs once for InfoNCE and
    the AR head together (CoCa), the bidirectional one for MLM: 2 trunk passes, not 3. The loss and
    every gradient equal those of separate passes; text from other documents still gets its own pass."""
    from mmpretrain.models.multitask import ModelOutput

    cfg = load_model_config("tiny")
    images, tokens, text = _inputs(cfg)
    assert torch.equal(text.ar_input_ids, tokens.ids)  # what the loader builds from the captions

    def run(shared: bool, batch):
        model = _model(mlm=True, ar=True)
        calls = []
        model.tower.transformer.register_forward_hook(lambda *_: calls.append(1))
        if shared:
            out = model(images=images, tokens=tokens.ids, eot_index=tokens.eot_index, text=batch)
        else:
            out = ModelOutput(image_features=model.encode_image(images),
                              text_features=model.encode_text(tokens.ids, tokens.eot_index),
                              logit_scale=model.tower.logit_scale.exp(), text=model.text_predictions(batch))
        mlm, ar = out.text["mlm"], out.text["ar"]
        loss = (clip_loss(out.image_features, out.text_features, out.logit_scale)["loss"]
                + token_loss(mlm.hidden, mlm.decoder_weight, mlm.labels, bias=mlm.bias)["loss"]
                + token_loss(ar.hidden, ar.decoder_weight, ar.labels)["loss"])
        params = [p for p in model.parameters() if p.requires_grad]
        return len(calls), loss, torch.autograd.grad(loss, params, allow_unused=True)

    passes, loss, grads = run(True, text)
    ref_passes, ref_loss, ref_grads = run(False, text)
    assert (passes, ref_passes) == (2, 3)
    torch.testing.assert_close(loss, ref_loss)
    assert sum(g is not None for g in grads) == sum(g is not None for g in ref_grads) > 10
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r)
    other = text_batch(list(reversed(TEXTS)), Tokenizer(context_length=cfg["text_cfg"]["context_length"]),
                       MaskingConfig(probability=0.3), torch.Generator().manual_seed(0))
    assert run(True, other)[0] == 3  # documents that are not the captions: the AR head runs its own pass


def test_used_columns_is_the_prefix_that_holds_every_mark():
    from mmpretrain.models.text_trunk import used_columns

    real = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labelled = torch.zeros(2, 5, dtype=torch.bool)
    assert used_columns(real) == 3
    labelled[0, 3] = True  # a mark past the longest text still counts
    assert used_columns(real, labelled) == 4
    assert used_columns(torch.zeros(2, 5, dtype=torch.bool)) == 1


@pytest.mark.parametrize("from_captions", [True, False])
def test_the_trunk_runs_on_the_used_columns_with_the_padded_batchs_results(monkeypatch, from_captions):
    """Captions, MLM, AR and sentence-pair inputs padded to 32 tokens: the trunk sees only the columns
    up to the longest text, and features, predictions, the loss and every gradient equal those of
    the trunk run on all 32 columns (used_columns made to keep everything)."""
    import mmpretrain.models.heads as heads_module
    import mmpretrain.models.multitask as multitask_module

    cfg = load_model_config("tiny")
    images, tokens, text = _inputs(cfg)
    if not from_captions:  # other captions, shorter than the text batch: the AR head runs its own pass
        tokens = Tokenizer(context_length=32).encode(["a ring", "two stars", "a red square", "a heart"])

    def run():
        model = _model(sentence_pair=True)
        widths = []
        model.tower.transformer.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
        out = model(images, tokens.ids, tokens.eot_index, text)
        loss = _all_losses(out)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return widths, out, loss.detach(), grads

    widths, out, loss, grads = run()
    captions, longest = int(tokens.lengths.max()), int(text.lengths.max())
    pair_longest = int(text.pairs.attention_mask.sum(1).max())
    # captions, MLM, AR (unless it reuses the captions' pass: the text batch is those captions), sentence pair
    expected = [captions, longest, pair_longest] if from_captions else [captions, longest, longest, pair_longest]
    assert max(widths) < 32 and widths == expected
    for module in (heads_module, multitask_module):
        monkeypatch.setattr(module, "used_columns", lambda *masks: masks[0].shape[1])
    full_widths, full, full_loss, full_grads = run()
    assert full_widths == [32] * len(expected)
    torch.testing.assert_close(out.text_features, full.text_features)
    for name in ("mlm", "ar"):
        torch.testing.assert_close(out.text[name].hidden, full.text[name].hidden)
        assert torch.equal(out.text[name].labels, full.text[name].labels)
    torch.testing.assert_close(out.text["pair"].logits, full.text["pair"].logits)
    torch.testing.assert_close(loss, full_loss)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], msg=name)
