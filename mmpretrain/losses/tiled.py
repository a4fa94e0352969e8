"""InfoNCE over tiles: the (n, m) logits matrix never exists, only (tile, tile) blocks of it.

At B = 32768 the plain loss holds several B×B float32 matrices (4 GiB each; see
pipelines/bench/contrastive_memory.py); here memory is O((n + m)·d + tile²). Forward walks the
tiles once, keeping per row (queries → keys) a running log-sum-exp and the maxima that decide
the argmax, and for the symmetric CLIP loss the same per column (keys → queries) from the same
tile, so one matmul serves both directions. Backward recomputes each tile from the saved
log-sum-exps (the FlashAttention trick) and accumulates the gradients of both feature matrices
and of the scale.

Loss for query i with positive key i + offset, over logits z = s·⟨q_i, k_j⟩:
    row_i = logsumexp_j z_ij − z_i,i+offset            (mean over the n rows)
symmetric (n == m, offset 0) adds, for every key j, col_j = logsumexp_i z_ij − z_jj, and returns
(mean row + mean col) / 2, which is open_clip's ClipLoss on one process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _blocks(n: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, n)) for start in range(0, n, tile)]


class _Running:
    """Per entry of the kept axis (a query, or a key in the column direction), folded in tile by
    tile over the reduced axis: the log-sum-exp of its logits, its positive logit, and the largest
    logit before and from its positive. The argmax is the positive iff before < positive == from,
    which is argmax's first-index rule on ties (duplicate captions tie exactly). Tracking maxima
    instead of indices matters: on CPU `max(dim)` with indices took 15-25× as long as `amax`, and for
    both directions over half as long as the tile's matmul (float32, d = 512, measured).
    """

    def __init__(self, n: int, offset: int, like: Tensor):
        self.offset = offset  # entry i's positive is at reduced index i + offset
        self.lse, self.before, self.after = (like.new_full((n,), float("-inf")) for _ in range(3))
        self.pos = like.new_full((n,), float("nan"))

    def update(self, logits: Tensor, lo: int, hi: int, base: int) -> None:
        """Fold in `logits` (hi - lo, t): kept entries [lo, hi) × reduced indices [base, base + t)."""
        best = logits.amax(1)  # (k,) also the shift that keeps exp from overflowing
        tile_lse = (logits - best[:, None]).exp_().sum(1).log_().add_(best)
        self.lse[lo:hi] = torch.logaddexp(self.lse[lo:hi], tile_lse)
        if base + logits.shape[1] <= lo + self.offset:  # the tile lies before every positive
            self.before[lo:hi] = torch.maximum(self.before[lo:hi], best)
        elif base > hi - 1 + self.offset:  # after every positive
            self.after[lo:hi] = torch.maximum(self.after[lo:hi], best)
        else:  # holds some positives: at most two such tiles per row block
            self._straddle(logits, lo, hi, base)

    def _straddle(self, logits: Tensor, lo: int, hi: int, base: int) -> None:
        target = torch.arange(lo, hi, device=logits.device) + (self.offset - base)  # (k,) may lie outside
        is_before = torch.arange(logits.shape[1], device=logits.device) < target[:, None]  # (k, t)
        neg_inf = logits.new_tensor(float("-inf"))
        before = torch.where(is_before, logits, neg_inf).amax(1)
        after = torch.where(is_before, neg_inf, logits).amax(1)
        self.before[lo:hi] = torch.maximum(self.before[lo:hi], before)
        self.after[lo:hi] = torch.maximum(self.after[lo:hi], after)
        here = (target >= 0) & (target < logits.shape[1])  # (k,) positive inside this tile
        pos = logits.gather(1, target.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
        self.pos[lo:hi] = torch.where(here, pos, self.pos[lo:hi])

    def accuracy(self) -> Tensor:
        return ((self.before < self.pos) & (self.pos >= self.after)).to(self.lse.dtype).mean()


class TiledInfoNCE(torch.autograd.Function):
    """`loss, acc_rows, acc_cols = TiledInfoNCE.apply(q, k, scale, offset, tile, symmetric)`.

    q (n, d), k (m, d), scale a one-element tensor, all of one floating dtype. acc_cols is nan
    unless symmetric. Use `tiled_info_nce`, which checks the arguments.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, offset: int, tile: int, symmetric: bool):
        n, m = q.shape[0], k.shape[0]
        qs = q * scale.reshape(())  # (n, d): scaled once so that each tile is a single matmul
        rows = _Running(n, offset, q)
        cols = _Running(m, 0, q) if symmetric else None
        for i0, i1 in _blocks(n, tile):
            for j0, j1 in _blocks(m, tile):
                logits = qs[i0:i1] @ k[j0:j1].T  # (ti, tj)
                rows.update(logits, i0, i1, j0)
                if cols is not None:
                    cols.update(logits.T, j0, j1, i0)  # (tj, ti) view: keys against queries
        loss = (rows.lse - rows.pos).mean()
        acc_cols = q.new_full((), float("nan"))
        if cols is not None:
            loss = (loss + (cols.lse - cols.pos).mean()) / 2
            acc_cols = cols.accuracy()
        ctx.save_for_backward(q, k, scale, rows.lse, cols.lse if cols is not None else rows.lse)
        ctx.offset, ctx.tile, ctx.symmetric = offset, tile, symmetric
        acc_rows = rows.accuracy()
        ctx.mark_non_differentiable(acc_rows, acc_cols)
        return loss, acc_rows, acc_cols

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_acc_rows, _grad_acc_cols):
        q, k, scale, lse_rows, lse_cols = ctx.saved_tensors
        offset, tile, symmetric = ctx.offset, ctx.tile, ctx.symmetric
        n, m = q.shape[0], k.shape[0]
        s = scale.reshape(())
        qs = q * s  # (n, d)
        # dL/dz_ij = w_rows·softmax_row_ij + w_cols·softmax_col_ij − w_pos·[j = i + offset]
        w_rows = 1 / (2 * n) if symmetric else 1 / n
        w_cols = 1 / (2 * m)
        w_pos = w_rows + w_cols if symmetric else w_rows
        # w·exp(z − lse) = exp(z − (lse − log w)): fold the weights into the shifts, saving a pass.
        shift_rows = lse_rows - math.log(w_rows)
        shift_cols = lse_cols - math.log(w_cols)
        g_q = torch.zeros_like(q)  # Σ_j dL/dz_ij · k_j; times s it is dL/dq
        g_k = torch.zeros_like(k)  # Σ_i dL/dz_ij · s·q_i = dL/dk
        for i0, i1 in _blocks(n, tile):
            for j0, j1 in _blocks(m, tile):
                logits = qs[i0:i1] @ k[j0:j1].T  # (ti, tj)
                g_z = logits.sub(shift_rows[i0:i1, None]).exp_()
                if symmetric:
                    g_z.add_(logits.sub_(shift_cols[j0:j1]).exp_())
                g_q[i0:i1] += g_z @ k[j0:j1]
                g_k[j0:j1] += g_z.T @ qs[i0:i1]
        g_q.sub_(k[offset : offset + n], alpha=w_pos)
        g_k[offset : offset + n].sub_(qs, alpha=w_pos)
        # z_ij = s·⟨q_i, k_j⟩, so dL/ds = Σ_ij dL/dz_ij ⟨q_i, k_j⟩ = Σ_i ⟨q_i, g_q_i⟩.
        g_s = (q * g_q).sum().reshape(scale.shape)
        return g_q.mul_(s * grad_loss), g_k.mul_(grad_loss), g_s * grad_loss, None, None, None


def tiled_info_nce(
    q: Tensor, k: Tensor, scale: Tensor, *, tile_size: int, offset: int = 0, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """InfoNCE of queries `q` (n, d) against keys `k` (m, d) over logits scale·q·kᵀ, in tiles.

    Query i's positive is key i + offset (offset + n ≤ m). Returns (loss, acc_rows, acc_cols):
    the mean row cross-entropy, or with `symmetric` (n == m, offset 0) the mean of the row and
    column cross-entropies; accuracies are the fraction of rows (columns) whose argmax is the
    positive, acc_cols nan unless symmetric. Peak extra memory is O((n + m)·d + tile_size²).
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled_info_nce needs q (n, d) and k (m, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    n, m = q.shape[0], k.shape[0]
    if symmetric and (n != m or offset != 0):
        raise ValueError(f"symmetric InfoNCE needs n == m and offset 0, got n={n}, m={m}, offset={offset}")
    if offset < 0 or offset + n > m:
        raise ValueError(f"positives k[offset : offset + n] must exist: offset={offset}, n={n}, m={m}")
    if scale.numel() != 1:
        raise ValueError(f"scale must have one element, got shape {tuple(scale.shape)}")
    return TiledInfoNCE.apply(q, k, scale, offset, tile_size, symmetric)
