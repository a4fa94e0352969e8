"""CLIP's symmetric InfoNCE (Radford et al. 2021), on one or many processes, plain or tiled.

Under torch.distributed the features of all ranks are gathered with gradient, so callers pass
their local features and never gather themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.losses.collectives import all_gather_with_grad
from mmpretrain.losses.tiled import tiled_info_nce
from mmpretrain.runtime import gather_sizes, rank_and_world

DEFAULT_TILE_SIZE = 1024
"""A `tile_size` for clip_loss that meets pipelines/bench/contrastive_memory.py's targets."""


def check_pairs(image_features: Tensor, text_features: Tensor, name: str) -> None:
    """ValueError unless both are (n, d) tensors of one shape: row i of each is a pair."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"{name} needs image and text features of one shape (batch, dim), got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32: half/bf16 logits lose the small softmax probabilities."""
    return torch.promote_types(x.dtype, torch.float32)


def as_scalar(value: Tensor | float, like: Tensor, name: str) -> Tensor:
    """`value` as a one-element tensor of `like`'s dtype and device, differentiable if it was."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    return value.to(dtype=like.dtype, device=like.device)


def _plain_one_way(q: Tensor, k: Tensor, scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    logits = scale * q @ k.T  # (n, m)
    target = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).to(q.dtype).mean()


def _plain_symmetric(img: Tensor, txt: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    logits = scale * img @ txt.T  # (B, B); its transpose is the text → image logits
    target = torch.arange(img.shape[0], device=img.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    acc_i2t = (logits.argmax(1) == target).to(img.dtype).mean()
    acc_t2i = (logits.argmax(0) == target).to(img.dtype).mean()
    return loss, acc_i2t, acc_t2i


def _one_way(q: Tensor, k: Tensor, scale: Tensor, offset: int, tile_size: int | None):
    if tile_size is None:
        return _plain_one_way(q, k, scale, offset)
    loss, acc, _ = tiled_info_nce(q, k, scale, tile_size=tile_size, offset=offset)
    return loss, acc


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    local_loss: bool = False,
    tile_size: int | None = None,
) -> dict[str, Tensor]:
    """Symmetric cross-entropy over logit_scale · I · Tᵀ (open_clip's ClipLoss).

    image_features, text_features: (n, d) local features, row i of each a pair; normalising them
    is the caller's job (the loss is correct either way). logit_scale: the multiplier s itself
    (already exp'd and clamped by the model), as in open_clip.

    With torch.distributed initialised and world > 1 the features are gathered with gradient:
    - global form (default): every rank computes the full-batch loss; uneven local batches work.
    - `local_loss=True`: rank r scores its own images against all texts and its own texts against
      all images (positives offset by earlier ranks' sizes); with equal local batches the mean of
      the per-rank losses is the full-batch loss. O(n·B) instead of O(B²) logits per rank.
    `tile_size` switches to the tiled loss (never builds the logits matrix, same values).

    Returns {"loss", "acc_i2t", "acc_t2i", "logit_scale"}; accuracies are the fraction of the rows
    this rank scored whose argmax is the positive. All but "loss" are detached.
    """
    check_pairs(image_features, text_features, "clip_loss")
    dtype = compute_dtype(image_features)
    img, txt = image_features.to(dtype), text_features.to(dtype)
    scale = as_scalar(logit_scale, img, "logit_scale")
    rank, _ = rank_and_world()
    sizes = gather_sizes(img.shape[0], img.device)
    all_img = all_gather_with_grad(img, sizes)  # (B, d)
    all_txt = all_gather_with_grad(txt, sizes)  # (B, d)
    if local_loss:
        offset = sum(sizes[:rank])
        loss_i2t, acc_i2t = _one_way(img, all_txt, scale, offset, tile_size)
        loss_t2i, acc_t2i = _one_way(txt, all_img, scale, offset, tile_size)
        loss = (loss_i2t + loss_t2i) / 2
    elif tile_size is None:
        loss, acc_i2t, acc_t2i = _plain_symmetric(all_img, all_txt, scale)
    else:
        loss, acc_i2t, acc_t2i = tiled_info_nce(all_img, all_txt, scale, tile_size=tile_size, symmetric=True)
    return {
        "loss": loss,
        "acc_i2t": acc_i2t.detach(),
        "acc_t2i": acc_t2i.detach(),
        "logit_scale": scale.detach().reshape(()),
    }
