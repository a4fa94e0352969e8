"""The differentiable collective for losses computed over the whole global batch.

`accelerator.gather` is not differentiable, so a gathered batch would give gradients to this rank's
own features only. `all_gather_with_grad` carries gradient back to every rank's features. The
loss functions in this package call these helpers themselves, so callers never gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmpretrain.runtime import gather_sizes, rank_and_world


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        rank, world = rank_and_world()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        # all_gather needs equal shapes: pad every rank to the largest size, then trim.
        pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad]).contiguous()  # (max_n, ...)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank differentiates a loss that reads every rank's features, so the gradient for
        # this rank's features is the SUM of the gradients all ranks computed for that slice. DDP
        # then averages parameter gradients over ranks: with a global loss that every rank
        # computes identically, sum-then-average gives exactly the full-batch gradient; with
        # per-rank losses it gives the gradient of their mean. open_clip's gather_with_grad does
        # the same with reduce_scatter (torch.distributed.nn.all_gather); gloo has no
        # reduce_scatter, so all_reduce the whole gradient and keep our slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def all_gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `x` from all ranks along dim 0, differentiably; `x` unchanged at world 1.

    First-dim sizes may differ between ranks. `sizes` (from `gather_sizes`) skips the size
    exchange when the caller already has it. In backward the incoming gradient is summed over
    ranks and this rank's rows are returned (see the comment in `_AllGatherWithGrad.backward`).
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _AllGatherWithGrad.apply(x, sizes)

