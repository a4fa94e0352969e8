"""Token cross-entropy (MLM, AR) through the tied embedding, chunked over predicted positions.

A 49k vocabulary times a few thousand predicted tokens is hundreds of MB of float32 logits, and
autograd would keep both the logits and their softmax. Here each chunk's logits exist only inside
the forward loop, which also computes that chunk's gradient (softmax − one-hot) and keeps only the
(N, D), (V, D) and (V,) gradients for backward: peak O(chunk·V + N·D + V·D).

The cost is the vocabulary: three (V × D) products and a V-wide softmax per predicted token (about
0.3 ms a token at D = 64 on a 2-core CPU, 90 % of a text-on step of the tiny model). The exact loss
decodes every predicted position. `fraction` < 1 is the cheaper, named estimator: it decodes a
uniform random subset of k = ceil(fraction · N) of a call's N positions and weights each by N / k.
Every position is in the subset with probability k / N, so the expected loss and gradient are
exactly the full ones (an unbiased estimate, with more variance); what is optimised is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpretrain.data.records import IGNORE_INDEX
from mmpretrain.losses.contrastive import compute_dtype
from mmpretrain.runtime import all_reduce_sum, rank_and_world


class _ChunkedTokenCE(torch.autograd.Function):
    """(summed CE, number correct) of hidden (N, D) against labels (N,) over hidden·weightᵀ + bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, want_grad: bool):
        dtype = torch.promote_types(compute_dtype(hidden), weight.dtype)
        w = weight.to(dtype)  # (V, D)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w, need_b = (want_grad and need for need in ctx.needs_input_grad[:3])
        g_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        g_w = g_b = None  # the first chunk's products, then accumulated into: no zero-filled (V, D) pass
        total, correct = w.new_zeros(()), torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(dtype)  # (c, D)
            y = labels[start : start + chunk_size]  # (c,)
            logits = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (c, V)
            top = logits.amax(1)  # (c,)
            target = logits.gather(1, y[:, None]).squeeze(1)  # (c,)
            # argmax == y, counted without an argmax over the whole chunk (~5x an amax on CPU): only rows
            # whose target reaches the maximum can be right, and argmax settles ties there (first index).
            hit = target == top
            correct += (logits[hit].argmax(1) == y[hit]).sum()
            # log-sum-exp and softmax from one exp, in the logits' memory: e = exp(logits - max).
            expd = logits.sub_(top[:, None]).exp_()
            norm = expd.sum(1)  # (c,)
            total += (top + norm.log() - target).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(CE summed over the chunk)/d logits = softmax − one-hot.
            g_logits = expd.div_(norm[:, None])
            g_logits[torch.arange(len(y), device=y.device), y] -= 1
            if need_h:
                g_h[start : start + chunk_size] = g_logits @ w
            if need_w:
                g_w = g_logits.T @ h if g_w is None else g_w.addmm_(g_logits.T, h)
            if need_b:
                g_b = g_logits.sum(0) if g_b is None else g_b.add_(g_logits.sum(0))
        if need_w and g_w is None:  # no predicted position: zero gradients, still in the graph
            g_w = torch.zeros_like(w)
        if need_b and g_b is None:
            g_b = torch.zeros_like(b)
        ctx.grads = (g_h, g_w, g_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_correct):
        # In place: the (V, D) gradient is this function's own, and a second one would be another full pass.
        grads = [None if g is None else g.mul_(grad_total).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None)


def token_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 2048,
    num_tokens: int | Tensor | None = None,
    fraction: float = 1.0,
    positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """Cross-entropy of predicted tokens over logits hidden · weightᵀ + bias, normalised globally.

    hidden (..., D); labels (...) long, IGNORE_INDEX (-100) where nothing is predicted; weight
    (V, D) the tied token-embedding matrix; bias (V,) optional. Only predicted positions are
    decoded, `chunk_size` of them at a time. Values and gradients equal the unchunked
    `F.cross_entropy(..., reduction="sum") / N_global`, times the world size (below).

    N_global is `num_tokens` when given (the trainer's global count of predicted tokens over an
    accumulation window, all ranks), else the sum over ranks of this call's count. Rank r
    returns W · sum_r / N_global: DDP averages gradients over the W ranks, so the average is
    Σ_r ∇sum_r / N_global, the gradient of the global token mean, and the mean over ranks of the
    returned loss is that mean; a rank's own token mean would overweight ranks with few tokens
    (HF Trainer scales by the world size the same way). With no predicted token anywhere the
    loss is a graph-connected 0 (every input still gets a zero gradient, so DDP sees them used).

    `fraction` in (0, 1]: decode only a uniform random subset of ceil(fraction · N) of this call's
    N predicted positions (drawn from torch's default generator of hidden's device, so a resumed or
    re-run step draws the same), each weighted N / k: an unbiased estimate of the value and gradient
    above (module docstring). `positions` (k,) instead names the subset: indices into the N
    predicted positions in row-major order, distinct (the tests enumerate subsets with it). Each
    process draws from its own positions, so 1 and 2 processes on one global batch decode different
    subsets: the same estimator, not the same numbers (exact equality needs fraction 1).

    Returns {"loss", "accuracy", "tokens"}: accuracy is correct / decoded over this call's decoded
    tokens on all ranks (0 when there are none), tokens is N_global (every predicted token, decoded
    or not); both detached and identical on all ranks.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"token_loss: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + (dim,)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"token_loss: weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"token_loss: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"token_loss: chunk_size must be >= 1, got {chunk_size}")
    if not 0 < fraction <= 1:
        raise ValueError(f"token_loss: fraction must be in (0, 1], got {fraction}")
    keep = labels != IGNORE_INDEX
    y = labels[keep]  # (N,) boolean indexing syncs with the device anyway, so checking costs little
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        raise ValueError(f"token_loss: labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}, "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    h = hidden[keep]  # (N, D): only the predicted positions are decoded
    predicted = y.numel()
    if positions is None and fraction < 1 and predicted:
        positions = sample_positions(predicted, fraction, h.device)
    if positions is not None:
        if positions.ndim != 1 or not 0 < positions.numel() <= predicted or positions.unique().numel() != positions.numel():
            raise ValueError(f"token_loss: positions must be 1 to {predicted} distinct indices, got {tuple(positions.shape)}")
        h, y = h[positions], y[positions]  # (k, D), (k,)
    total, correct = _ChunkedTokenCE.apply(h, weight, bias, y, chunk_size, torch.is_grad_enabled())
    if positions is not None:
        total = total * (predicted / y.numel())  # each decoded token stands for N / k of them
    # Integer counts: float32 stops counting exactly at 2**24 tokens.
    count, decoded, correct = all_reduce_sum(
        torch.stack([correct.new_tensor(predicted), correct.new_tensor(y.numel()), correct])).to(total.dtype)
    n_global = count if num_tokens is None else torch.as_tensor(num_tokens, device=total.device).to(total.dtype)
    _, world = rank_and_world()
    return {
        "loss": total * world / n_global.clamp(min=1),
        "accuracy": correct / decoded.clamp(min=1),
        "tokens": n_global.detach(),
    }


def sample_positions(n: int, fraction: float, device: torch.device | str = "cpu") -> Tensor:
    """(k,) sorted distinct indices in [0, n), k = ceil(fraction · n), every k-subset equally likely
    (a prefix of a uniform permutation from torch's default generator of `device`)."""
    k = max(1, math.ceil(fraction * n))
    return torch.randperm(n, device=device)[:k].sort().values
