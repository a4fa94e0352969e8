"""Losses: pure functions returning a dict of named scalars ("loss" differentiable, the rest detached
metrics). Distributed runs need nothing from the caller: features are gathered with gradient and
token counts summed over ranks inside each loss."""

from mmpretrain.losses.collectives import all_gather_with_grad
from mmpretrain.losses.contrastive import clip_loss
from mmpretrain.losses.siglip import siglip_loss
from mmpretrain.losses.text import TokenTargets, token_loss, token_losses
from mmpretrain.runtime import rank_and_world

__all__ = ["TokenTargets", "all_gather_with_grad", "clip_loss", "rank_and_world", "siglip_loss", "token_loss",
           "token_losses"]
