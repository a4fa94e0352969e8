"""The train step: exact gradient accumulation over K micro-batches (`accumulate_step`); the losses
of each forward are weighted and summed by mmpretrain.losses.objective.compute_losses.

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
from torch import Tensor

from mmpretrain.config import LossConfig
from mmpretrain.data.records import ImageTextBatch, TextBatch
from mmpretrain.losses.objective import OBJECTIVES, compute_losses, counted, weighted_sum
from mmpretrain.runtime import all_reduce_sum

MicroBatch = ImageTextBatch | TextBatch  # a TextBatch alone trains the text branch only


def accumulate_step(model: torch.nn.Module, micro_batches: list[MicroBatch], loss_cfg: LossConfig, *,
                    backward: Callable[[Tensor], None] = Tensor.backward,
                    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Forward and backward of one optimizer step over K micro-batches; gradients land in `.grad`.

    Each micro-batch is an ImageTextBatch on the model's device, whose `text` (a TextBatch, from text
    shards or from the captions) feeds the text heads, or a TextBatch alone. `model` is called as given (DDP wrapper or
    not). `backward` is e.g. `accelerator.backward`; `no_sync` e.g. `lambda: accelerator.no_sync(model)`:
    all but the last micro-batch run under it, so DDP all-reduces the summed gradients once.

    Returns the window's metrics as floats: "loss" and the parts of `compute_losses`, where the
    contrastive loss and its metrics are those of the whole window, per-target losses are summed
    over micro-batches (each already divided by the window's count), and accuracies are over all
    the window's predicted targets. With K = 1 this is one plain forward and backward.
    """
    if not micro_batches:
        raise ValueError("accumulate_step needs at least one micro-batch")
    if len(micro_batches) == 1:
        parts = compute_losses(model(**model_inputs(micro_batches[0])), loss_cfg)
        backward(parts.loss)
        return parts.floats()
    cache = cache_features(model, micro_batches)
    counts = count_targets(micro_batches)  # (K, len(counted())) global counts of each per-target loss
    window = {name: counts[:, j].sum() for j, name in enumerate(counted())}
    per_batch = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            parts = _recompute(model, batch, i, cache, loss_cfg, window, detach_scale=not last)
            backward(parts.loss)
        per_batch.append(parts.values)
    return merge_metrics(per_batch, counts, loss_cfg)


def model_inputs(batch: MicroBatch, text: bool = True) -> dict[str, Any]:
    """The keyword arguments of MultitaskModel.forward for a batch (without the text branch: text=False)."""
    if isinstance(batch, TextBatch):
        return {"text": batch} if text else {}
    inputs = {"images": batch.images, "tokens": batch.tokens, "eot_index": batch.eot_index}
    if text and batch.text is not None:
        inputs["text"] = batch.text
    return inputs


def _device(batch: MicroBatch) -> torch.device:
    return (batch.mlm_input_ids if isinstance(batch, TextBatch) else batch.images).device


def _text(batch: MicroBatch) -> TextBatch | None:
    return batch if isinstance(batch, TextBatch) else batch.text


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """CPU generator state, and the CUDA one of `device` when the batch lives there."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def cache_features(model: torch.nn.Module, micro_batches: list[MicroBatch]) -> dict[str, list]:
    """Pass 1: each micro-batch's image/text features without gradient, and the RNG state that
    was current before its forward (to replay its random choices). Text heads are not run."""
    cache: dict[str, list] = {"rng": [], "image_features": [], "text_features": []}
    for batch in micro_batches:
        cache["rng"].append(rng_state(_device(batch)))
        out = model(**model_inputs(batch, text=False))
        cache["image_features"].append(out.image_features)  # (n_i, E) or None
        cache["text_features"].append(out.text_features)  # (n_i, E) or None
    return cache


def count_targets(micro_batches: list[MicroBatch]) -> Tensor:
    """(K, len(counted())) long: the targets of each per-target loss in each micro-batch, summed over ranks."""
    device = _device(micro_batches[0])
    rows = []
    for batch in micro_batches:
        text = _text(batch)
        rows.append(torch.stack([
            torch.as_tensor(OBJECTIVES[name].count(text), dtype=torch.long).to(device) if text is not None
            else torch.zeros((), dtype=torch.long, device=device) for name in counted()]))
    return all_reduce_sum(torch.stack(rows))  # one collective for the whole window


def _recompute(model, batch: MicroBatch, i: int, cache: dict[str, list], loss_cfg: LossConfig,
               window: dict[str, Tensor], detach_scale: bool):
    """Pass 2 for micro-batch i: live forward, window features with rows i live, losses."""
    set_rng_state(cache["rng"][i], _device(batch))  # same dropped patches as in pass 1
    out = model(**model_inputs(batch))
    if out.image_features is not None:
        out.image_features = with_live_rows(cache["image_features"], i, out.image_features)  # (Σ n_j, E)
        out.text_features = with_live_rows(cache["text_features"], i, out.text_features)  # (Σ n_j, E)
    return compute_losses(out, loss_cfg, num_targets=window, detach_scale=detach_scale)


def with_live_rows(cached: list[Tensor], i: int, live: Tensor) -> Tensor:
    """The window's features, (Σ n_j, E): cached micro-batches (no gradient) around the live one."""
    pieces = [c.detach().to(live.dtype) for c in cached]
    pieces[i] = live
    return torch.cat(pieces)


def merge_metrics(per_batch: list[dict[str, Tensor]], counts: Tensor, loss_cfg: LossConfig) -> dict[str, float]:
    """Window metrics from the K re-runs' parts: sums for the per-target losses, count-weighted
    accuracies, the last re-run's value for the rest (the contrastive loss, temperature and target
    counts are window-wide in every re-run)."""
    merged = dict(per_batch[-1])
    for j, name in enumerate(counted()):
        if f"{name}_loss" in merged:
            merged[f"{name}_loss"] = torch.stack([p[f"{name}_loss"] for p in per_batch]).sum()
        key = f"{name}_accuracy"
        if key in merged:
            weights = counts[:, j].to(merged[key].dtype)  # (K,)
            accs = torch.stack([p[key] for p in per_batch])  # (K,)
            merged[key] = (accs * weights).sum() / weights.sum().clamp(min=1)
    terms = {name: merged[f"{name}_loss"] for name in OBJECTIVES if f"{name}_loss" in merged}
    return {"loss": float(weighted_sum(terms, loss_cfg)), **{k: float(v) for k, v in merged.items()}}
