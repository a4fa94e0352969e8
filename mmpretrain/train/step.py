"""The train step: weight and sum the losses (`compute_losses`), and exact gradient accumulation
over K micro-batches (`accumulate_step`).

Why accumulation needs care: the contrastive loss of a window of K micro-batches couples every
image with every text of the window, so summing K per-micro-batch contrastive losses is a
different (smaller-batch) objective. Exact accumulation (GradCache, Gao et al. 2021; open_clip's
`--accum-freq`) instead:
1. runs every micro-batch without gradient and caches its image/text features;
2. re-runs micro-batch i with gradient and puts its live features in place of its cached rows, so
   the loss is the whole window's loss and backward reaches exactly micro-batch i's activations;
3. restores the RNG state of step 1 before each re-run, so patch dropout drops the same patches
   and the live features equal the cached ones bit for bit.
Summed over i, the feature gradients are those of one big batch. The temperature (and SigLIP's
bias) enter the loss directly, not through any micro-batch, so their gradient must be taken once:
we detach them in every re-run but the last (open_clip takes it K times, a known pain).
Token losses (MLM, AR) and the sentence-pair loss are sums over their own micro-batch divided by
the window's global count, so their K backward passes add up to the big-batch gradient too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.config import Contrastive, LossConfig, choices
from mmpretrain.data.text.masking import IGNORE_INDEX
from mmpretrain.losses import clip_loss, siglip_loss, token_loss
from mmpretrain.runtime import all_reduce_sum, rank_and_world

TARGETS = ("mlm", "ar", "pair")  # objectives whose loss is divided by a count of predicted targets
WINDOW_SUMS = ("mlm_loss", "ar_loss", "pair_loss")  # per-micro-batch parts that add up over a window


# ---------------------------------------------------------------------------- losses of one forward
def compute_losses(out: dict[str, Any], loss_cfg: LossConfig, *, num_tokens: dict[str, Any] | None = None,
                   detach_scale: bool = False) -> dict[str, Tensor]:
    """Named parts of the loss for one model output, and "loss", their weighted sum (differentiable).

    Parts present depend on `out`: "clip_loss" (InfoNCE or SigLIP, per loss_cfg.contrastive) with
    "logit_scale" and "acc_i2t"/"acc_t2i" or "pos_prob"/"neg_prob"; "mlm_loss", "mlm_accuracy",
    "mlm_tokens"; "ar_loss", ...; "pair_loss", "pair_accuracy". `num_tokens` ({"mlm", "ar", "pair"},
    any subset) replaces the global count that a token/pair loss divides by (an accumulation
    window's count); `detach_scale` cuts the gradient of the temperature and the logit bias.
    Everything but "loss" is detached. A weight of 0 still keeps its head in the graph (DDP).
    """
    num_tokens = num_tokens or {}
    parts: dict[str, Tensor] = {}
    if "image_features" in out and "text_features" in out:
        parts.update(_contrastive(out, loss_cfg, detach_scale))
    chunk = loss_cfg.token_chunk_size
    if "mlm_hidden" in out:
        mlm = token_loss(out["mlm_hidden"], out["decoder_weight"], out["mlm_labels"], bias=out["mlm_bias"],
                         chunk_size=chunk, num_tokens=num_tokens.get("mlm"))
        parts.update(mlm_loss=mlm["loss"], mlm_accuracy=mlm["accuracy"], mlm_tokens=mlm["tokens"])
    if "ar_hidden" in out:
        ar = token_loss(out["ar_hidden"], out["decoder_weight"], out["ar_labels"], chunk_size=chunk,
                        num_tokens=num_tokens.get("ar"))
        parts.update(ar_loss=ar["loss"], ar_accuracy=ar["accuracy"], ar_tokens=ar["tokens"])
    if "pair_logits" in out:
        parts.update(_pair_loss(out["pair_logits"], out["pair_labels"], num_tokens.get("pair")))
    loss = weighted_sum(parts, loss_cfg)
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


def weighted_sum(parts: dict[str, Tensor], loss_cfg: LossConfig) -> Tensor:
    """Σ weight × part over the loss parts present (a float 0 when there are none)."""
    weights = {"clip_loss": loss_cfg.clip_weight, "mlm_loss": loss_cfg.mlm_weight,
               "ar_loss": loss_cfg.ar_weight, "pair_loss": loss_cfg.pair_weight}
    terms = [weights[name] * parts[name] for name in weights if name in parts]
    if not terms:
        raise ValueError("the model output has nothing to compute a loss from (no features, no text heads)")
    return torch.stack(terms).sum()


def _contrastive(out: dict[str, Any], loss_cfg: LossConfig, detach_scale: bool) -> dict[str, Tensor]:
    scale, bias = out["logit_scale"], out.get("logit_bias")
    if detach_scale:  # see the module docstring: their gradient is taken in one re-run only
        scale = scale.detach()
        bias = bias.detach() if bias is not None else None
    img, txt = out["image_features"], out["text_features"]  # (n, E) each
    if loss_cfg.contrastive == "siglip":
        if bias is None:
            raise ValueError("the siglip loss needs a logit bias: build the model with "
                             "TowerOptions(init_logit_bias=-10.0)")
        res = siglip_loss(img, txt, scale, bias)
        return {"clip_loss": res["loss"], "pos_prob": res["pos_prob"], "neg_prob": res["neg_prob"],
                "logit_scale": scale.detach().reshape(()), "logit_bias": bias.detach().reshape(())}
    if loss_cfg.contrastive != "clip":
        raise ValueError(f"loss.contrastive = {loss_cfg.contrastive!r}: must be one of {', '.join(choices(Contrastive))}")
    res = clip_loss(img, txt, scale, local_loss=loss_cfg.local_loss, tile_size=loss_cfg.tile_size)
    return {"clip_loss": res["loss"], "acc_i2t": res["acc_i2t"], "acc_t2i": res["acc_t2i"],
            "logit_scale": res["logit_scale"]}


def _pair_loss(logits: Tensor, labels: Tensor, num_pairs: Any = None) -> dict[str, Tensor]:
    """Cross-entropy summed here and divided by the global pair count, times the world size: the
    same normalisation as token_loss, so DDP's gradient average gives the global-batch mean and an
    accumulation window can pass its own count."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n, 2) at least float32
    total = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum()
    count, correct = all_reduce_sum(torch.stack([correct.new_tensor(labels.numel()), correct])).to(total.dtype)
    n_global = count if num_pairs is None else torch.as_tensor(num_pairs, device=total.device).to(total.dtype)
    _, world = rank_and_world()
    return {"pair_loss": total * world / n_global.clamp(min=1), "pair_accuracy": correct / count.clamp(min=1)}


# ---------------------------------------------------------------------------- exact accumulation
def accumulate_step(model: torch.nn.Module, micro_batches: list[dict], loss_cfg: LossConfig, *,
                    backward: Callable[[Tensor], None] = Tensor.backward,
                    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Forward and backward of one optimizer step over K micro-batches; gradients land in `.grad`.

    Each micro-batch holds "images", "tokens", "eot_index" and optionally "text" (a text_batch
    dict); other keys are ignored, so loader batches can be passed as they are. `model` is called
    as given (DDP wrapper or not). `backward` is e.g. `accelerator.backward`; `no_sync` e.g.
    `lambda: accelerator.no_sync(model)`: all but the last micro-batch run under it, so DDP
    all-reduces the summed gradients once.

    Returns the window's metrics as floats: "loss" and the parts of `compute_losses`, where the
    contrastive loss and its metrics are those of the whole window, token/pair losses are summed
    over micro-batches (each already divided by the window's count), and accuracies are over all
    the window's predicted tokens. With K = 1 this is one plain forward and backward.
    """
    if not micro_batches:
        raise ValueError("accumulate_step needs at least one micro-batch")
    if len(micro_batches) == 1:
        parts = compute_losses(model(**_model_inputs(micro_batches[0])), loss_cfg)
        backward(parts["loss"])
        return {k: float(v.detach()) for k, v in parts.items()}
    cache = cache_features(model, micro_batches)
    counts = count_targets(micro_batches)  # (K, 3) global counts of mlm, ar, pair targets
    window = {name: counts[:, j].sum() for j, name in enumerate(TARGETS)}
    per_batch = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            parts = _recompute(model, batch, i, cache, loss_cfg, window, detach_scale=not last)
            backward(parts.pop("loss"))
        per_batch.append(parts)
    return merge_metrics(per_batch, counts, loss_cfg)


def _model_inputs(batch: dict) -> dict[str, Any]:
    return {k: batch[k] for k in ("images", "tokens", "eot_index", "text") if batch.get(k) is not None}


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """CPU generator state, and the CUDA one of `device` when the batch lives there."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _device(batch: dict) -> torch.device:
    tensor = batch.get("images", batch.get("tokens"))
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def cache_features(model: torch.nn.Module, micro_batches: list[dict]) -> dict[str, list]:
    """Pass 1: each micro-batch's image/text features without gradient, and the RNG state that
    was current before its forward (to replay its random choices). Text heads are not run."""
    cache: dict[str, list] = {"rng": [], "image_features": [], "text_features": []}
    for batch in micro_batches:
        cache["rng"].append(rng_state(_device(batch)))
        inputs = {k: batch[k] for k in ("images", "tokens", "eot_index") if batch.get(k) is not None}
        out = model(**inputs) if inputs else {}
        for key in ("image_features", "text_features"):
            cache[key].append(out.get(key))  # (n_i, E) or None
    return cache


def count_targets(micro_batches: list[dict]) -> Tensor:
    """(K, 3) long: MLM, AR and sentence-pair targets of each micro-batch, summed over ranks."""
    device = _device(micro_batches[0])
    zero = torch.zeros((), dtype=torch.long, device=device)
    rows = []
    for batch in micro_batches:
        text = batch.get("text") or {}
        mlm, ar, pair = (text.get(k) for k in ("mlm_labels", "ar_labels", "pair_labels"))
        rows.append(torch.stack([
            (mlm != IGNORE_INDEX).sum().to(device) if mlm is not None else zero,
            (ar != IGNORE_INDEX).sum().to(device) if ar is not None else zero,
            zero + pair.numel() if pair is not None else zero,
        ]))
    return all_reduce_sum(torch.stack(rows))  # one collective for the whole window


def _recompute(model, batch: dict, i: int, cache: dict[str, list], loss_cfg: LossConfig,
               window: dict[str, Tensor], detach_scale: bool) -> dict[str, Tensor]:
    """Pass 2 for micro-batch i: live forward, window features with rows i live, losses."""
    device = _device(batch)
    set_rng_state(cache["rng"][i], device)  # same dropped patches as in pass 1
    out = model(**_model_inputs(batch))
    for key in ("image_features", "text_features"):
        if key in out:
            out[key] = with_live_rows(cache[key], i, out[key])  # (Σ n_j, E)
    return compute_losses(out, loss_cfg, num_tokens=window, detach_scale=detach_scale)


def with_live_rows(cached: list[Tensor], i: int, live: Tensor) -> Tensor:
    """The window's features, (Σ n_j, E): cached micro-batches (no gradient) around the live one."""
    pieces = [c.detach().to(live.dtype) for c in cached]
    pieces[i] = live
    return torch.cat(pieces)


def merge_metrics(per_batch: list[dict[str, Tensor]], counts: Tensor, loss_cfg: LossConfig) -> dict[str, float]:
    """Window metrics from the K re-runs' parts: sums for the token/pair losses, count-weighted
    accuracies, the last re-run's value for the rest (the contrastive loss, temperature and token
    counts are window-wide in every re-run)."""
    merged = dict(per_batch[-1])
    for name in WINDOW_SUMS:
        if name in merged:
            merged[name] = torch.stack([p[name] for p in per_batch]).sum()
    for j, name in enumerate(TARGETS):
        key = f"{name}_accuracy"
        if key in merged:
            weights = counts[:, j].to(merged[key].dtype)  # (K,)
            accs = torch.stack([p[key] for p in per_batch])  # (K,)
            merged[key] = (accs * weights).sum() / weights.sum().clamp(min=1)
    merged["loss"] = weighted_sum(merged, loss_cfg)
    return {k: float(v) for k, v in merged.items()}
