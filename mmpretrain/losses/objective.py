"""The objective: every loss part of one forward, weighted and summed in one place.

Each part is registered once in OBJECTIVES under the name of what it trains ("clip" for the
contrastive loss, a head name from mmpretrain.models.heads.TEXT_HEADS for the text branch). Its
weight is the config field `loss.{name}_weight`; its value is logged as `{name}_loss` next to its own
metrics. Parts whose loss is a sum over predicted targets divided by a global count (token and pair
losses) say how to count a batch's targets, so exact accumulation can divide by a window's count.

A new text head registers its loss here:

    OBJECTIVES["span"] = Objective(loss=_span_loss, count=lambda text: ...)   # plus loss.span_weight

or, for a vocabulary head (its prediction is TokenPredictions), `loss=None`: every vocabulary head of
a forward is decoded in one call through the tied embedding (token_losses), weighted there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.config import Contrastive, LossConfig, choices
from mmpretrain.data.records import IGNORE_INDEX, TextBatch
from mmpretrain.losses.contrastive import clip_loss
from mmpretrain.losses.siglip import siglip_loss
from mmpretrain.losses.text import TokenTargets, token_losses
from mmpretrain.models.heads import PairPredictions, TokenPredictions
from mmpretrain.models.multitask import ModelOutput
from mmpretrain.runtime import all_reduce_sum, rank_and_world


@dataclass(frozen=True)
class Objective:
    loss: Callable[..., dict[str, Tensor]] | None
    """(prediction, loss_cfg, num_targets) -> {"loss": differentiable, metric name: detached value}.
    None: a vocabulary head (its prediction is TokenPredictions), decoded together with the other
    vocabulary heads through their tied embedding (token_losses: one decode, one (V, D) gradient),
    its share weighted by loss.{name}_weight and sampled by loss.{name}_fraction if the config has one."""
    count: Callable[[TextBatch], Tensor] | None = None
    """Targets of a text batch this loss divides by (None: not a per-target loss)."""


@dataclass
class LossParts:
    """One forward's loss: `loss` = Σ weight × part (differentiable); `values` the detached parts
    ("clip_loss", "mlm_loss", ...) and their metrics, named as they are logged."""

    loss: Tensor
    values: dict[str, Tensor] = field(default_factory=dict)

    def floats(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), **{k: float(v) for k, v in self.values.items()}}


def _pair(pred: PairPredictions, loss_cfg: LossConfig, num_targets: Any) -> dict[str, Tensor]:
    """Cross-entropy summed here and divided by the global pair count, times the world size: the
    same normalisation as token_loss, so DDP's gradient average gives the global-batch mean and an
    accumulation window can pass its own count."""
    logits = pred.logits.to(torch.promote_types(pred.logits.dtype, torch.float32))  # (n, 2) at least float32
    total = F.cross_entropy(logits, pred.labels, reduction="sum")
    correct = (logits.argmax(1) == pred.labels).sum()
    count, correct = all_reduce_sum(torch.stack([correct.new_tensor(pred.labels.numel()), correct])).to(total.dtype)
    n_global = count if num_targets is None else torch.as_tensor(num_targets, device=total.device).to(total.dtype)
    _, world = rank_and_world()
    return {"loss": total * world / n_global.clamp(min=1), "pair_accuracy": correct / count.clamp(min=1)}


def _contrastive(out: ModelOutput, loss_cfg: LossConfig, detach_scale: bool) -> dict[str, Tensor]:
    scale, bias = out.logit_scale, out.logit_bias
    if detach_scale:  # exact accumulation takes their gradient in one re-run only (train/step.py)
        scale = scale.detach()
        bias = bias.detach() if bias is not None else None
    img, txt = out.image_features, out.text_features  # (n, E) each
    if loss_cfg.contrastive == "siglip":
        if bias is None:
            raise ValueError("the siglip loss needs a logit bias: build the model with "
                             "TowerOptions(init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)")
        res = siglip_loss(img, txt, scale, bias)
        return {"loss": res["loss"], "pos_prob": res["pos_prob"], "neg_prob": res["neg_prob"],
                "logit_scale": scale.detach().reshape(()), "logit_bias": bias.detach().reshape(())}
    if loss_cfg.contrastive != "clip":
        raise ValueError(f"loss.contrastive = {loss_cfg.contrastive!r}: must be one of {', '.join(choices(Contrastive))}")
    res = clip_loss(img, txt, scale, local_loss=loss_cfg.local_loss, tile_size=loss_cfg.tile_size)
    return {"loss": res["loss"], "acc_i2t": res["acc_i2t"], "acc_t2i": res["acc_t2i"],
            "logit_scale": res["logit_scale"]}


OBJECTIVES: dict[str, Objective] = {
    "clip": Objective(loss=_contrastive),
    "mlm": Objective(loss=None, count=lambda text: (text.mlm_labels != IGNORE_INDEX).sum()),
    "ar": Objective(loss=None, count=lambda text: (text.ar_labels != IGNORE_INDEX).sum()),
    "pair": Objective(loss=_pair, count=lambda text: torch.tensor(text.pairs.labels.numel() if text.pairs else 0)),
}


def counted() -> tuple[str, ...]:
    """The per-target losses (read at call time, so a registration made after import counts)."""
    return tuple(name for name, o in OBJECTIVES.items() if o.count is not None)


def compute_losses(out: ModelOutput, loss_cfg: LossConfig, *, num_targets: dict[str, Any] | None = None,
                   detach_scale: bool = False) -> LossParts:
    """Every part `out` allows: the contrastive loss when it has both features, one part per head
    prediction. `num_targets` ({name: count}, any subset of `counted()`) replaces the global count a
    per-target loss divides by (an accumulation window's count); `detach_scale` cuts the gradient of
    the temperature and the logit bias. A weight of 0 still keeps its head in the graph (DDP)."""
    num_targets = num_targets or {}
    terms: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    if out.image_features is not None and out.text_features is not None:
        res = _contrastive(out, loss_cfg, detach_scale)
        terms["clip"] = res.pop("loss")
        values.update(res)
    decoded: dict[str, TokenPredictions] = {}
    for name, pred in out.text.items():
        if OBJECTIVES[name].loss is None:
            decoded[name] = pred
            continue
        res = OBJECTIVES[name].loss(pred, loss_cfg, num_targets.get(name))
        terms[name] = res.pop("loss")
        values.update(res)
    loss = weighted_sum(terms, loss_cfg) if terms else None
    logged = {f"{n}_loss": t.detach() for n, t in terms.items()}
    if decoded:
        joint, parts = vocabulary_losses(decoded, loss_cfg, num_targets)
        loss = joint if loss is None else loss + joint
        for name, res in parts.items():
            logged[f"{name}_loss"] = res["loss"]
            values.update({f"{name}_accuracy": res["accuracy"], f"{name}_tokens": res["tokens"]})
    if loss is None:
        raise ValueError("the model output has nothing to compute a loss from (no features, no text heads)")
    return LossParts(loss, {**logged, **{k: v.detach() for k, v in values.items()}})


def vocabulary_losses(preds: dict[str, TokenPredictions], loss_cfg: LossConfig, num_targets: dict[str, Any]):
    """The vocabulary heads' weighted sum in one decode through their tied embedding, and each one's parts."""
    weights = {id(p.decoder_weight): p.decoder_weight for p in preds.values()}
    if len(weights) != 1:
        raise ValueError("the vocabulary heads must share one decoder weight (the tied token embedding)")
    targets = {name: TokenTargets(p.hidden, p.labels, bias=p.bias, weight=getattr(loss_cfg, f"{name}_weight"),
                                  num_tokens=num_targets.get(name), fraction=getattr(loss_cfg, f"{name}_fraction", 1.0))
               for name, p in preds.items()}
    return token_losses(next(iter(weights.values())), targets, chunk_size=loss_cfg.token_chunk_size)


def weighted_sum(terms: dict[str, Tensor], loss_cfg: LossConfig) -> Tensor:
    """Σ loss.{name}_weight × term over the parts present."""
    if not terms:
        raise ValueError("the model output has nothing to compute a loss from (no features, no text heads)")
    return torch.stack([getattr(loss_cfg, f"{name}_weight") * term for name, term in terms.items()]).sum()


def text_weight_factor(loss_cfg: LossConfig, step: int, steps: int) -> float:
    """The multiplier of every text head's weight at optimizer step `step` (0-based) of `steps`: 1 before
    loss.text_weight_decay_from · steps, then a cosine that reaches loss.text_weight_end at the last step."""
    end, start = loss_cfg.text_weight_end, loss_cfg.text_weight_decay_from
    if end == 1.0:
        return 1.0
    progress = step / (steps - 1) if steps > 1 else 1.0  # 0 at the first step, 1 at the last
    if progress <= start:
        return 1.0
    t = (progress - start) / (1.0 - start)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def scheduled(loss_cfg: LossConfig, step: int, steps: int) -> tuple[LossConfig, float]:
    """loss_cfg with the text heads' weights (every objective but "clip") times text_weight_factor, and
    the factor. The same config object comes back when the factor is 1."""
    factor = text_weight_factor(loss_cfg, step, steps)
    if factor == 1.0:
        return loss_cfg, factor
    weights = {f"{name}_weight": getattr(loss_cfg, f"{name}_weight") * factor for name in OBJECTIVES if name != "clip"}
    return dataclasses.replace(loss_cfg, **weights), factor
