"""Text-branch metrics as streaming sums: MLM accuracy on masked tokens, AR perplexity.

Each batch adds its sums and counts; ``result()`` divides once at the end, so the metrics are
token-weighted over the whole evaluation set whatever the batch sizes (a mean of per-batch
perplexities would not be). Processes merge their accumulators (or all-reduce ``as_tensor()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.data.records import IGNORE_INDEX
from mmpretrain.eval.retrieval import EvalInputError


def mlm_counts(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(correct, predicted tokens) of one MLM batch.

    logits (B, L, V); labels (B, L) hold the original id at masked positions, ignore_index elsewhere.
    """
    mask = labels != ignore_index  # (B, L)
    predicted = logits[mask].argmax(-1)  # (n,)
    return int((predicted == labels[mask]).sum()), int(mask.sum())


def ar_counts(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) of one AR batch.

    labels (B, L) are already shifted (labels[:, i] is the token after position i, as
    mmpretrain.data.text.masking.ar_targets makes them); logits (B, L, V) are at the same positions.
    """
    mask = labels != ignore_index  # (B, L)
    picked = logits[mask]  # (n, V)
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # half logits: sum in float32
    nll = F.cross_entropy(picked, labels[mask], reduction="sum")
    return float(nll), int(mask.sum())


@dataclass
class TextMetrics:
    """Running sums over an evaluation set; ``update`` per batch, ``result`` once at the end."""

    mlm_correct: int = 0  # masked tokens predicted exactly
    mlm_tokens: int = 0  # masked tokens scored
    ar_nll_sum: float = 0.0  # summed next-token negative log-likelihood, nats
    ar_tokens: int = 0  # next-token predictions scored

    def update(self, *, mlm_correct=0, mlm_tokens=0, ar_nll_sum=0.0, ar_tokens=0) -> None:
        """Add one batch's sums; tensors are accepted (0-d, e.g. from ``.sum()``)."""
        mc, mt, at = (int(_item(v)) for v in (mlm_correct, mlm_tokens, ar_tokens))
        nll = float(_item(ar_nll_sum))
        if min(mc, mt, at) < 0 or mc > mt:
            raise EvalInputError(f"text metrics: bad counts mlm_correct={mc}, mlm_tokens={mt}, "
                                 f"ar_tokens={at}; counts must be >= 0 and correct <= tokens")
        if not math.isfinite(nll) or nll < 0 or (at == 0 and nll > 0):
            raise EvalInputError(f"text metrics: ar_nll_sum={nll} for {at} tokens; "
                                 f"it must be a finite sum >= 0")
        self.mlm_correct += mc
        self.mlm_tokens += mt
        self.ar_nll_sum += nll
        self.ar_tokens += at

    def merge(self, other: TextMetrics) -> TextMetrics:
        """Add another accumulator's sums into this one (e.g. another process's); returns self."""
        self.update(**{f.name: getattr(other, f.name) for f in fields(other)})
        return self

    def as_tensor(self) -> Tensor:
        """(4,) float64 of the sums, for an all-reduce; float64 holds counts exactly up to 2**53."""
        sums = [self.mlm_correct, self.mlm_tokens, self.ar_nll_sum, self.ar_tokens]
        return torch.tensor(sums, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, sums: Tensor) -> TextMetrics:
        """The accumulator of an all-reduced ``as_tensor()``."""
        mc, mt, nll, at = sums.tolist()
        return cls(round(mc), round(mt), nll, round(at))

    def result(self) -> dict[str, float | int]:
        """``mlm_accuracy``, ``mlm_tokens`` when MLM tokens were counted; ``ar_nll`` (mean, nats),
        ``ar_perplexity`` = exp(total NLL / total tokens), ``ar_tokens`` when AR tokens were."""
        if self.mlm_tokens == 0 and self.ar_tokens == 0:
            raise EvalInputError("text metrics: no MLM or AR tokens were counted; "
                                 "the text shards gave nothing to score")
        out: dict[str, float | int] = {}
        if self.mlm_tokens:
            out.update(mlm_accuracy=self.mlm_correct / self.mlm_tokens, mlm_tokens=self.mlm_tokens)
        if self.ar_tokens:
            mean_nll = self.ar_nll_sum / self.ar_tokens
            # math.exp overflows a double past ~709.78: report inf rather than raise
            perplexity = math.exp(mean_nll) if mean_nll < 709.0 else math.inf
            out.update(ar_nll=mean_nll, ar_perplexity=perplexity, ar_tokens=self.ar_tokens)
        return out


def _item(value):
    return value.item() if isinstance(value, Tensor) else value
