"""The train step: loss weighting, and exact contrastive accumulation (K micro-batches = one big batch).

All in float64 on the tiny model with every head on (MLM, AR, sentence order), so "exact" means
agreement to ~1e-10 relative for the loss, every metric and the gradient of every parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.config import LossConfig
from mmpretrain.data.records import ImageTextBatch
from mmpretrain.data.text.masking import MaskingConfig
from mmpretrain.data.text.objectives import concat_text_batches, text_batch
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.losses import clip_loss, siglip_loss, token_loss
from mmpretrain.losses.objective import compute_losses
from mmpretrain.models import TowerOptions, build_model, load_model_config
from mmpretrain.train import step as step_module
from mmpretrain.train.step import accumulate_step, cache_features, model_inputs, set_rng_state

F64 = torch.float64
TEXTS = ["A red circle sits on a blue square. It looks calm.", "Two small stars. They shine brightly at night.",
         "A green triangle beside a ring.", "Three hearts drawn in a row on white paper.",
         "An old boat on a quiet lake. Mist rises slowly.", "A cat sleeps on the warm sofa.",
         "Yellow flowers in a glass vase. The room is bright.", "A man rides a bike down the hill.",
         "Snow covers the tiny village. Lights glow in windows.", "Two dogs play with a ball.",
         "A plate of pasta with basil leaves.", "The train leaves the station at dawn. Nobody waves."]
SIZES = (4, 3, 5)  # uneven micro-batches, 12 pairs in the window


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=32)


def _model(options: TowerOptions = TowerOptions()):
    torch.manual_seed(0)
    return build_model(load_model_config("tiny"), options, sentence_pair=True).double().train()


def _micro_batches(tokenizer, sizes=SIZES, seed: int = 0) -> list[ImageTextBatch]:
    gen = torch.Generator().manual_seed(seed)
    batches, start = [], 0
    for n in sizes:
        texts = TEXTS[start:start + n]
        start += n
        tokens = tokenizer.encode(texts)
        text = text_batch(texts, tokenizer, MaskingConfig(probability=0.3), gen, pair_objective="sop")
        batches.append(ImageTextBatch(images=torch.randn(n, 3, 64, 64, generator=gen, dtype=F64), tokens=tokens.ids,
                                      eot_index=tokens.eot_index, lengths=tokens.lengths,
                                      labels=torch.full((n,), -1), captions=texts, text=text))
    return batches


def _concat(batches: list[ImageTextBatch]) -> ImageTextBatch:
    """One micro-batch holding all of `batches`, rows in order (the same masking and pair draws)."""
    def cat(name):
        return torch.cat([getattr(b, name) for b in batches])

    return ImageTextBatch(images=cat("images"), tokens=cat("tokens"), eot_index=cat("eot_index"),
                          lengths=cat("lengths"), labels=cat("labels"),
                          text=concat_text_batches([b.text for b in batches]))


def _run(model, batches, loss_cfg, **kwargs) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    metrics = accumulate_step(model, batches, loss_cfg, **kwargs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return metrics, grads


def _assert_close_grads(got: dict, want: dict, rel: float = 1e-10, skip=()):
    assert got.keys() == want.keys()
    for name in want:
        if name in skip:
            continue
        err = (got[name] - want[name]).norm()
        assert err <= rel * want[name].norm() + 1e-14, f"{name}: |diff| {err:.3g} vs |grad| {want[name].norm():.3g}"


CASES = {
    "clip": (LossConfig(), TowerOptions()),
    "clip_tiled": (LossConfig(tile_size=5), TowerOptions()),  # tiles straddle the micro-batch borders
    "siglip": (LossConfig(contrastive="siglip"), TowerOptions(init_logit_bias=-10.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_accumulation_equals_one_big_batch(case, tokenizer):
    loss_cfg, options = CASES[case]
    model = _model(options)
    batches = _micro_batches(tokenizer)
    big, big_grads = _run(model, [_concat(batches)], loss_cfg)
    calls = []
    in_no_sync = [False]

    class NoSync:
        def __enter__(self):
            in_no_sync[0] = True

        def __exit__(self, *exc):
            in_no_sync[0] = False

    def backward(loss):
        calls.append(in_no_sync[0])
        loss.backward()

    acc, acc_grads = _run(model, batches, loss_cfg, backward=backward, no_sync=NoSync)
    assert calls == [True, True, False]  # K backward passes, DDP syncs only on the last one
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(big_grads) == trainable - ({"tower.logit_bias"} if case != "siglip" else set())
    _assert_close_grads(acc_grads, big_grads)
    assert acc.keys() == big.keys()
    for key in big:
        assert acc[key] == pytest.approx(big[key], rel=1e-10, abs=1e-14), key
    assert big["mlm_tokens"] > 0 and big["pair_loss"] > 0


@pytest.mark.parametrize("case", ["clip", "siglip"])
def test_temperature_gradient_counted_once_not_k_times(case, tokenizer, monkeypatch):
    loss_cfg, options = CASES[case]
    model = _model(options)
    batches = _micro_batches(tokenizer)
    _, exact = _run(model, batches, loss_cfg)
    real = step_module.compute_losses
    # The naive accumulation (open_clip's --accum-freq): the temperature stays live in every re-run.
    monkeypatch.setattr(step_module, "compute_losses",
                        lambda out, cfg, **kw: real(out, cfg, **{**kw, "detach_scale": False}))
    _, naive = _run(model, batches, loss_cfg)
    scales = ["tower.logit_scale"] + (["tower.logit_bias"] if case == "siglip" else [])
    for name in scales:  # each re-run's loss is the whole window's, so each adds the full dL/ds
        assert float(exact[name]) != 0.0
        assert float(naive[name]) == pytest.approx(len(batches) * float(exact[name]), rel=1e-10)
    _assert_close_grads(naive, exact, skip=scales)  # nothing else changes


def test_patch_dropout_replays_the_cached_features(tokenizer):
    model = _model(TowerOptions(patch_dropout=0.5))
    batches = _micro_batches(tokenizer)
    inputs = model_inputs(batches[0], text=False)
    # Dropout is really active: two plain forwards of one batch differ.
    assert not torch.equal(model(**inputs).image_features, model(**inputs).image_features)
    torch.manual_seed(7)
    cache = cache_features(model, batches)
    for i in reversed(range(len(batches))):  # any order: the state of pass 1 is restored
        set_rng_state(cache["rng"][i], torch.device("cpu"))
        live = model(**model_inputs(batches[i], text=False))
        assert torch.equal(live.image_features, cache["image_features"][i])
        assert torch.equal(live.text_features, cache["text_features"][i])
    # The step itself: its window loss is the loss of the cached (pass-1) features.
    loss_cfg = LossConfig()
    torch.manual_seed(7)
    metrics = accumulate_step(model, batches, loss_cfg)
    torch.manual_seed(7)
    cache = cache_features(model, batches)
    want = clip_loss(torch.cat(cache["image_features"]), torch.cat(cache["text_features"]),
                     model.tower.logit_scale.exp())["loss"]
    assert metrics["clip_loss"] == pytest.approx(float(want.detach()), rel=1e-13)


def test_text_only_micro_batches(tokenizer):
    model = _model()
    batches = [b.text for b in _micro_batches(tokenizer)]
    big, big_grads = _run(model, [_concat(_micro_batches(tokenizer)).text], LossConfig())
    acc, acc_grads = _run(model, batches, LossConfig())
    assert "clip_loss" not in acc and acc.keys() == big.keys()
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-10)
    _assert_close_grads(acc_grads, big_grads)


WEIGHTS = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1), (0.5, 2.0, 0.0, 3.0)]


def test_compute_losses_parts_and_weights(tokenizer):
    model = _model()
    batch = _concat(_micro_batches(tokenizer))
    out = model(**model_inputs(batch))
    mlm, ar, pair = out.text["mlm"], out.text["ar"], out.text["pair"]
    want = {
        "clip_loss": clip_loss(out.image_features, out.text_features, out.logit_scale)["loss"],
        "mlm_loss": token_loss(mlm.hidden, mlm.decoder_weight, mlm.labels, bias=mlm.bias)["loss"],
        "ar_loss": token_loss(ar.hidden, ar.decoder_weight, ar.labels)["loss"],
        "pair_loss": F.cross_entropy(pair.logits, pair.labels),
    }
    # The AR prediction keeps exactly the positions with a next token, in order.
    ar_labels = batch.text.ar_labels
    assert torch.equal(ar.labels, ar_labels[ar_labels != -100]) and ar.bias is None
    for w in WEIGHTS:
        cfg = LossConfig(clip_weight=w[0], mlm_weight=w[1], ar_weight=w[2], pair_weight=w[3])
        parts = compute_losses(out, cfg)
        for name, value in want.items():
            assert float(parts.values[name]) == pytest.approx(value.detach().item(), rel=1e-12), name
            assert not parts.values[name].requires_grad
        expected = sum(wi * want[k].detach().item() for wi, k in zip(w, ("clip_loss", "mlm_loss", "ar_loss", "pair_loss")))
        assert parts.loss.item() == pytest.approx(expected, rel=1e-12)
    # A zero weight keeps its head in the graph (DDP needs every parameter used): zero gradient.
    model.zero_grad(set_to_none=True)
    compute_losses(out, LossConfig(mlm_weight=0.0)).loss.backward()
    assert torch.count_nonzero(model.mlm_head.dense.weight.grad) == 0


def test_num_tokens_and_detach_scale(tokenizer):
    model = _model(TowerOptions(init_logit_bias=-10.0))
    batch = _concat(_micro_batches(tokenizer))
    out = model(**model_inputs(batch))
    plain = compute_losses(out, LossConfig(contrastive="siglip")).values
    halved = compute_losses(out, LossConfig(contrastive="siglip"),
                            num_targets={"mlm": 2 * plain["mlm_tokens"], "ar": 2 * plain["ar_tokens"], "pair": 24}).values
    for name in ("mlm_loss", "ar_loss", "pair_loss"):
        assert float(halved[name]) == pytest.approx(float(plain[name]) / 2, rel=1e-12)
    want = siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)["loss"]
    assert float(plain["clip_loss"]) == pytest.approx(want.detach().item(), rel=1e-12)
    detached = compute_losses(out, LossConfig(contrastive="siglip", mlm_weight=0, ar_weight=0, pair_weight=0),
                              detach_scale=True)
    model.zero_grad(set_to_none=True)
    detached.loss.backward()
    assert model.tower.logit_scale.grad is None and model.tower.logit_bias.grad is None
    assert model.tower.text_projection.grad is not None


def test_misuse_is_a_value_error(tokenizer):
    model = _model()
    batch = _micro_batches(tokenizer, sizes=(2,))[0]
    out = model(images=batch.images, tokens=batch.tokens, eot_index=batch.eot_index)
    with pytest.raises(ValueError, match="logit bias"):
        compute_losses(out, LossConfig(contrastive="siglip"))
    with pytest.raises(ValueError, match="contrastive"):
        compute_losses(out, LossConfig(contrastive="infonce"))
    with pytest.raises(ValueError, match="at least one"):
        accumulate_step(model, [], LossConfig())


def test_a_new_head_needs_only_its_class_and_its_registrations(tokenizer, monkeypatch):
    """What the README's "adding a text head" promises: a head class, its TEXT_HEADS entry and Heads
    flag, its OBJECTIVES entry and its weight; the model, the weighted sum and exact accumulation
    (counting its targets over the window) take it up with no other change."""
    from dataclasses import dataclass

    from mmpretrain.losses import objective
    from mmpretrain.models import heads as heads_module

    class EchoHead(heads_module.MLMHead):  # predicts the MLM targets with parameters of its own
        name = "echo"

    @dataclass(frozen=True)
    class WithEcho(heads_module.Heads):
        echo: bool = True

    @dataclass
    class EchoLoss(LossConfig):
        echo_weight: float = 0.5

    monkeypatch.setitem(heads_module.TEXT_HEADS, "echo", EchoHead)
    # A vocabulary head: loss None, decoded with MLM and AR through the tied embedding in one call.
    monkeypatch.setitem(objective.OBJECTIVES, "echo", objective.Objective(loss=None, count=objective.OBJECTIVES["mlm"].count))
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny"), heads=WithEcho(mlm=True, ar=True, sentence_pair=True)).double()
    assert isinstance(model.echo_head, EchoHead) and "echo" in objective.counted()
    batches = _micro_batches(tokenizer)
    loss_cfg = EchoLoss()
    big, big_grads = _run(model, [_concat(batches)], loss_cfg)
    acc, acc_grads = _run(model, batches, loss_cfg)
    _assert_close_grads(acc_grads, big_grads)
    assert big["echo_tokens"] == big["mlm_tokens"] > 0 and acc["echo_loss"] == pytest.approx(big["echo_loss"], rel=1e-10)
    parts = ("clip", "mlm", "ar", "pair", "echo")
    weights = {"clip": 1.0, "mlm": 1.0, "ar": 1.0, "pair": 1.0, "echo": 0.5}
    assert big["loss"] == pytest.approx(sum(weights[p] * big[f"{p}_loss"] for p in parts), rel=1e-12)
    assert big_grads["echo_head.dense.weight"].abs().sum() > 0


# -- the text weights' warm-down (loss.text_weight_end, loss.text_weight_decay_from) ------------------
def test_text_weight_factor_is_a_cosine_from_one_to_the_end_value():
    import math

    from mmpretrain.losses.objective import scheduled, text_weight_factor

    down = LossConfig(text_weight_end=0.0)
    assert [text_weight_factor(down, s, 11) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert text_weight_factor(down, 2, 11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)), abs=1e-12)
    late = LossConfig(text_weight_end=0.2, text_weight_decay_from=0.5)
    assert [text_weight_factor(late, s, 11) for s in range(6)] == [1.0] * 6  # held until half the run
    assert text_weight_factor(late, 8, 11) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.6)), abs=1e-12)
    assert text_weight_factor(late, 10, 11) == pytest.approx(0.2, abs=1e-12)
    assert text_weight_factor(down, 0, 1) == 0.0  # a one-step run's only step is its last

    cfg = LossConfig(clip_weight=2.0, mlm_weight=0.5, ar_weight=3.0, pair_weight=1.5, text_weight_end=0.0)
    scaled, factor = scheduled(cfg, 5, 11)
    assert factor == pytest.approx(0.5)
    assert (scaled.clip_weight, scaled.mlm_weight, scaled.ar_weight, scaled.pair_weight) == pytest.approx(
        (2.0, 0.25, 1.5, 0.75))
    assert cfg.mlm_weight == 0.5  # the run's config is not changed
    constant = LossConfig()
    assert scheduled(constant, 7, 11) == (constant, 1.0)
