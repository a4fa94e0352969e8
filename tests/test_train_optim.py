"""AdamW parameter groups (open_clip's weight-decay split) and the warmup + cosine/constant schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mmpretrain.config import OptimConfig, ScheduleConfig
from mmpretrain.models import TowerOptions, build_model, load_model_config
from mmpretrain.train.optim import build_optimizer, build_scheduler, fused_supported, lr_factor, param_groups


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_model_config("tiny"), TowerOptions(init_logit_bias=-10.0), sentence_pair=True)


def _names(model, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_split_follows_open_clip(model):
    no_decay, decay = param_groups(model, 0.2)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.2)
    skip, keep = _names(model, no_decay), _names(model, decay)
    assert {"tower.logit_scale", "tower.logit_bias", "tower.visual.class_embedding", "tower.ln_final.weight",
            "tower.visual.ln_pre.bias", "tower.transformer.resblocks.0.attn.in_proj_bias",
            "mlm_head.bias", "mlm_head.norm.weight", "mlm_head.dense.bias", "pair_head.pooler.bias"} <= skip
    # 2-D embeddings decay in open_clip (its `exclude` only looks at ndim and the name).
    assert {"tower.token_embedding.weight", "tower.positional_embedding", "tower.visual.positional_embedding",
            "tower.visual.conv1.weight", "tower.text_projection", "tower.visual.proj",
            "tower.transformer.resblocks.0.attn.in_proj_weight", "tower.visual.transformer.resblocks.1.mlp.c_fc.weight",
            "mlm_head.dense.weight", "pair_head.segment_embedding.weight", "pair_head.classifier.weight"} <= keep
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any("bias" in n or "ln_" in n for n in keep)


def test_every_trainable_parameter_in_exactly_one_group(model):
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())


def test_frozen_image_tower_is_left_out():
    torch.manual_seed(0)
    lit = build_model(load_model_config("tiny"), TowerOptions(lock_image=True))
    names = set().union(*(_names(lit, g) for g in param_groups(lit, 0.1)))
    trainable = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert names == trainable
    assert not any(n.startswith("tower.visual.") for n in names)
    assert "tower.token_embedding.weight" in names


def test_build_optimizer_uses_the_config(model):
    cfg = OptimConfig(lr=3e-4, weight_decay=0.05, beta1=0.8, beta2=0.95, eps=1e-8)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)



def test_build_optimizer_fuses_on_cpu_and_updates_like_the_default():
    """optim.fused picks torch's fused kernel; its updates equal the default loop's over several steps."""
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny"))
    start = copy.deepcopy(model)
    other = copy.deepcopy(model)
    fused, plain = build_optimizer(model, OptimConfig()), build_optimizer(other, OptimConfig(fused=False))
    assert all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for a, b in zip(model.parameters(), other.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b, a0 in zip(model.named_parameters(), other.parameters(), start.parameters()):
        assert (a - a0).abs().max() > 1e-4, name  # every parameter moved (lr 5e-4, 4 steps) ...
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # ... and both kernels agree


def test_fused_only_where_torch_has_the_kernel():
    assert fused_supported([nn.Parameter(torch.zeros(3))])
    assert not fused_supported([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))])
    assert not fused_supported([])
    assert not fused_supported([nn.Parameter(torch.zeros(3))], device="meta")  # the device training runs on
    assert fused_supported([nn.Parameter(torch.zeros(3))], device=torch.device("cpu"))

COSINE = dict(total_steps=110, warmup_steps=10, name="cosine", min_lr_ratio=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),  # open_clip's warmup: (step + 1) / warmup, never a step at lr 0
    (4, 0.5),  # mid-warmup
    (9, 1.0),  # last warmup step reaches the peak
    (10, 1.0),  # cosine starts at the peak
    (35, 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),  # a quarter of the cosine: cos(pi/4)
    (60, 0.55),  # half way: halfway between the peak and the floor
    (110, 0.1),  # end: the floor
    (500, 0.1),  # past the end: stays at the floor
])
def test_cosine_lr_factor_by_hand(step, expected):
    assert lr_factor(step, **COSINE) == pytest.approx(expected, rel=1e-12)


def test_constant_and_no_warmup():
    assert [lr_factor(s, total_steps=50, warmup_steps=4, name="constant") for s in (0, 1, 3, 4, 49, 80)] == \
        [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(0, total_steps=100, warmup_steps=0) == 1.0
    assert lr_factor(100, total_steps=100, warmup_steps=0) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="schedule.name"):
        lr_factor(0, total_steps=10, warmup_steps=0, name="linear")


def test_scheduler_sets_the_lr_of_each_step():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=2e-3)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    seen = []
    for _ in range(61):
        seen.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-4) and seen[9] == pytest.approx(2e-3) and seen[60] == pytest.approx(1.1e-3)
    with pytest.raises(ValueError, match="schedule.name"):
        build_scheduler(opt, ScheduleConfig(name="step"), total_steps=10)
