"""Training: optimizer and schedule, the loss weighting and exact-accumulation train step."""

from mmpretrain.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from mmpretrain.train.step import accumulate_step, compute_losses

__all__ = ["accumulate_step", "build_optimizer", "build_scheduler", "compute_losses", "lr_factor",
           "param_groups"]
