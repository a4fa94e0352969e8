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
from dataclasses import dataclass

import torch
from torch import Tensor

from mmpretrain.data.records import IGNORE_INDEX
from mmpretrain.losses.contrastive import compute_dtype
from mmpretrain.runtime import all_reduce_sum, rank_and_world


class _ChunkedTokenCE(torch.autograd.Function):
    """Σ_s scale_s · (CE summed over part s) of several parts decoded through one weight (V, D), and
    each part's (summed CE, number correct). A part is (hidden (N_s, D), bias (V,) or None, labels
    (N_s,)); `scales` (Python floats, one per part) are folded into the gradients as they are made
    (`alpha`), so the parts share one (V, D) gradient: one write of it, not one per part plus a sum."""

    @staticmethod
    def forward(ctx, weight, chunk_size: int, want_grad: bool, scales: tuple[float, ...], *parts):
        hiddens, biases, labels = parts[0::3], parts[1::3], parts[2::3]
        dtype = weight.dtype
        for hidden in hiddens:
            dtype = torch.promote_types(dtype, compute_dtype(hidden))
        w = weight.to(dtype)  # (V, D)
        need_w = want_grad and ctx.needs_input_grad[0]
        g_w = None  # the first chunk's product, then accumulated into: no zero-filled (V, D) pass
        g_hs, g_bs, totals, corrects = [], [], [], []
        for i, (hidden, bias, y_all, scale) in enumerate(zip(hiddens, biases, labels, scales)):
            need_h = want_grad and ctx.needs_input_grad[4 + 3 * i]
            need_b = want_grad and ctx.needs_input_grad[5 + 3 * i]
            b = bias.to(dtype) if bias is not None else None
            g_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
            g_b = None
            total, correct = w.new_zeros(()), torch.zeros((), dtype=torch.long, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)  # (c, D)
                y = y_all[start : start + chunk_size]  # (c,)
                logits = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (c, V)
                top = logits.amax(1)  # (c,)
                target = logits.gather(1, y[:, None]).squeeze(1)  # (c,)
                # argmax == y, counted without an argmax over the whole chunk (~5x an amax on CPU): only
                # rows whose target reaches the maximum can be right, and argmax settles ties there.
                hit = target == top
                correct += (logits[hit].argmax(1) == y[hit]).sum()
                # log-sum-exp and softmax from one exp, in the logits' memory: e = exp(logits - max).
                expd = logits.sub_(top[:, None]).exp_()
                norm = expd.sum(1)  # (c,)
                total += (top + norm.log() - target).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(scale · CE summed over the chunk)/d logits = scale · (softmax − one-hot).
                g_logits = expd.div_(norm[:, None])
                g_logits[torch.arange(len(y), device=y.device), y] -= 1
                if need_h:
                    torch.mm(g_logits, w, out=g_h[start : start + chunk_size]).mul_(scale)
                if need_w:  # the first product is scaled through its (c, D) factor, not its (V, D) result
                    g_w = g_logits.T @ (h * scale) if g_w is None else g_w.addmm_(g_logits.T, h, alpha=scale)
                if need_b:
                    g_b = g_logits.sum(0).mul_(scale) if g_b is None else g_b.add_(g_logits.sum(0), alpha=scale)
            if need_b and g_b is None:  # no predicted position: zero gradients, still in the graph
                g_b = torch.zeros_like(b)
            g_hs.append(g_h)
            g_bs.append(g_b)
            totals.append(total)
            corrects.append(correct)
        if need_w and g_w is None:
            g_w = torch.zeros_like(w)
        totals, corrects = torch.stack(totals), torch.stack(corrects)
        ctx.grads = (g_w, g_hs, g_bs)
        ctx.dtypes = (weight.dtype, [h.dtype for h in hiddens], [None if b is None else b.dtype for b in biases])
        ctx.mark_non_differentiable(totals, corrects)
        loss = (totals * totals.new_tensor(scales)).sum()
        return loss, totals, corrects

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_totals, _grad_corrects):
        (g_w, g_hs, g_bs), (w_dtype, h_dtypes, b_dtypes) = ctx.grads, ctx.dtypes
        ctx.grads = None
        unit = bool(grad_loss == 1)  # the usual case: skip a pass over the (V, D) gradient

        def scaled(g, dtype):
            # In place: each gradient is this function's own, and a copy would be another full pass.
            return None if g is None else (g if unit else g.mul_(grad_loss)).to(dtype)

        parts = []
        for g_h, g_b, h_dtype, b_dtype in zip(g_hs, g_bs, h_dtypes, b_dtypes):
            parts += [scaled(g_h, h_dtype), scaled(g_b, b_dtype), None]
        return (scaled(g_w, w_dtype), None, None, None, *parts)


@dataclass
class TokenTargets:
    """One loss's share of a joint decode (token_losses): the predicted positions of one head."""

    hidden: Tensor  # (..., D) inputs of the decoder
    labels: Tensor  # (...) long, IGNORE_INDEX where nothing is predicted
    bias: Tensor | None = None  # (V,)
    weight: float = 1.0  # the loss's weight in the returned sum
    num_tokens: int | Tensor | None = None  # N_global (below), when the caller knows it
    fraction: float = 1.0  # the share of predicted positions decoded (the sampled estimator)
    positions: Tensor | None = None  # (k,) the decoded subset instead of a random one


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
    loss, parts = token_losses(weight, {"": TokenTargets(hidden, labels, bias=bias, num_tokens=num_tokens,
                                                         fraction=fraction, positions=positions)},
                               chunk_size=chunk_size)
    return {**parts[""], "loss": loss}


def token_losses(weight: Tensor, targets: dict[str, TokenTargets], *, chunk_size: int = 2048
                 ) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
    """Several token losses through one tied decoder `weight` (V, D) in one decode (MLM and AR):
    (Σ_name targets[name].weight × loss_name, differentiable; {name: {"loss" (detached), "accuracy",
    "tokens"}}), each loss_name exactly token_loss's of that part alone. One decode makes one (V, D)
    gradient for all parts instead of one per part, each a 50 MB pass or more at width 256."""
    if weight.ndim != 2:
        raise ValueError(f"token_loss: weight must be (vocab, dim), got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"token_loss: chunk_size must be >= 1, got {chunk_size}")
    selected = {name: _select(t, weight) for name, t in targets.items()}  # name -> (h, y, predicted)
    # The global counts first (one collective for all parts): each part's scale in the joint loss.
    counts = all_reduce_sum(torch.tensor([p for _, _, p in selected.values()], dtype=torch.long, device=weight.device))
    _, world = rank_and_world()
    units, n_globals = [], []  # each part's d(its normalised loss) / d(its summed CE), and N_global
    for t, count, (_, y, predicted) in zip(targets.values(), counts.tolist(), selected.values()):
        n_global = count if t.num_tokens is None else float(torch.as_tensor(t.num_tokens))
        n_globals.append(n_global)
        # Each decoded token stands for N / k of them; rank r's sum is scaled to W · sum_r / N_global.
        units.append(world * (predicted / max(y.numel(), 1)) / max(n_global, 1))
    scales = tuple(t.weight * unit for t, unit in zip(targets.values(), units))
    parts = [x for (h, y, _), t in zip(selected.values(), targets.values()) for x in (h, t.bias, y)]
    loss, totals, corrects = _ChunkedTokenCE.apply(weight, chunk_size, torch.is_grad_enabled(), scales, *parts)
    # Integer counts: float32 stops counting exactly at 2**24 tokens.
    decoded = torch.tensor([y.numel() for _, y, _ in selected.values()], dtype=torch.long, device=corrects.device)
    decoded, corrects = all_reduce_sum(torch.stack([decoded, corrects])).to(totals.dtype)
    out = {name: {"loss": totals[i] * units[i], "accuracy": corrects[i] / decoded[i].clamp(min=1),
                  "tokens": totals.new_tensor(n_globals[i])}
           for i, name in enumerate(targets)}
    return loss, out


def _select(t: TokenTargets, weight: Tensor) -> tuple[Tensor, Tensor, int]:
    """(decoded hidden (k, D), their labels (k,), N predicted positions) of one part, checked."""
    hidden, labels, bias = t.hidden, t.labels, t.bias
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"token_loss: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + (dim,)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"token_loss: weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"token_loss: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not 0 < t.fraction <= 1:
        raise ValueError(f"token_loss: fraction must be in (0, 1], got {t.fraction}")
    keep = labels != IGNORE_INDEX
    y = labels[keep]  # (N,) boolean indexing syncs with the device anyway, so checking costs little
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        raise ValueError(f"token_loss: labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}, "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    h = hidden[keep]  # (N, D): only the predicted positions are decoded
    predicted = y.numel()
    positions = t.positions
    if positions is None and t.fraction < 1 and predicted:
        positions = sample_positions(predicted, t.fraction, h.device)
    if positions is not None:
        if positions.ndim != 1 or not 0 < positions.numel() <= predicted or positions.unique().numel() != positions.numel():
            raise ValueError(f"token_loss: positions must be 1 to {predicted} distinct indices, got {tuple(positions.shape)}")
        h, y = h[positions], y[positions]  # (k, D), (k,)
    return h, y, predicted


def sample_positions(n: int, fraction: float, device: torch.device | str = "cpu") -> Tensor:
    """(k,) sorted distinct indices in [0, n), k = ceil(fraction · n), every k-subset equally likely
    (a prefix of a uniform permutation from torch's default generator of `device`)."""
    k = max(1, math.ceil(fraction * n))
    return torch.randperm(n, device=device)[:k].sort().values
