"""AdamW with open_clip's weight-decay split, and the warmup + cosine (or constant) schedule.

Weight decay follows open_clip_train/main.py exactly (its `exclude` lambda): no decay for a
parameter that is 0-/1-D (biases, norm gains, the temperature, the ViT class embedding) or whose
dotted name contains "bn", "ln", "bias" or "logit_scale". 2-D embeddings — the token embedding
(also the tied MLM/AR decoder), both positional embeddings, the sentence-pair segment embedding —
DO get decay, as in open_clip; keeping that makes our runs comparable with theirs.

The schedule is open_clip's `cosine_lr` / `const_lr` with a floor (`min_lr_ratio`), expressed as
a multiplier for `torch.optim.lr_scheduler.LambdaLR`, whose position (a few numbers) a checkpoint keeps
as JSON (mmpretrain.checkpoint.state).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmpretrain.config import OptimConfig, ScheduleConfig, ScheduleName, choices


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's `exclude`: 0-/1-D tensors, norms ("bn", "ln"), biases and the temperature."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: [no decay, decay]. Frozen ones (LiT) are left
    out, so the optimizer holds no state for them. Empty groups are dropped."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def fused_supported(params: list[nn.Parameter], device: torch.device | str | None = None) -> bool:
    """True when every parameter is floating point and torch has its fused AdamW kernel for `device`
    (the device training will run on; default: where each parameter is now)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(
        p.is_floating_point() and (torch.device(device).type if device is not None else p.device.type) in devices
        for p in params)


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig,
                    device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`: torch's fused kernel when `optim.fused` and torch has it for `device`
    (where the model will train; the trainer builds the optimizer before accelerate moves the model),
    else torch's default implementation (a per-tensor loop on CPU, foreach on CUDA).

    torch picks foreach/fused by itself only on CUDA, and never fused; on CPU its default loop runs ~10
    small ops per parameter tensor, so for a model whose 49k-row token embedding is most of its weights
    the update alone was 48 ms of a ~170 ms step (fused: 8 ms; measured with mmpretrain/models/model_configs/tiny.json,
    see pipelines/bench/optimizer_step.py).
    """
    groups = param_groups(model, optim_cfg.weight_decay)
    fused = optim_cfg.fused and fused_supported([p for g in groups for p in g["params"]], device)
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, name: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): the lr it uses is peak × this.

    Warmup is open_clip's `(step + 1) / warmup_steps`: a line from 0 (at step -1) that reaches the
    peak at step warmup_steps - 1, so no step is spent at lr 0. Then "constant" stays at 1 and
    "cosine" decays as min + (1 - min)·½(1 + cos(π·e/E)), e = step - warmup_steps,
    E = total_steps - warmup_steps: 1 at the end of warmup, min_lr_ratio at total_steps (and after).
    """
    if name not in choices(ScheduleName):
        raise ValueError(f"schedule.name = {name!r}: must be one of {', '.join(choices(ScheduleName))}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor`; call `scheduler.step()` once after every optimizer step."""
    lr_factor(0, total_steps=total_steps, warmup_steps=schedule_cfg.warmup_steps,
              name=schedule_cfg.name)  # fail on a bad name now, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=schedule_cfg.warmup_steps,
                         name=schedule_cfg.name, min_lr_ratio=schedule_cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seek_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put `scheduler` (and its optimizer's learning rates) where `step` optimizer steps leave it."""
    lrs = [base * factor(step) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch = step
    scheduler._last_lr = lrs  # what get_last_lr() reports
