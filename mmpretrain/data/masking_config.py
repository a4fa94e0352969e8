"""How masked-LM inputs are corrupted: plain data, validated on construction (no torch import, so the
training config can hold it as its `data.masking` section)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("token", "whole_word", "span")


@dataclass(frozen=True)
class MaskingConfig:
    probability: float = 0.15
    """Expected fraction of maskable tokens that are selected (predicted)."""
    strategy: str = "token"
    """"token" (BERT), "whole_word" (all BPE pieces of a word together) or "span" (SpanBERT)."""
    mask_fraction: float = 0.8
    """Of the selected units, the share replaced by `<mask>`."""
    random_fraction: float = 0.1
    """Of the selected units, the share replaced by random ordinary tokens; the rest stay unchanged."""
    span_p: float = 0.2
    """Geometric parameter of span lengths in words (SpanBERT: 0.2)."""
    max_span: int = 10
    """Longest span in words; lengths follow the geometric law renormalised on 1..max_span, as in
    SpanBERT's code (mean 3.8 words for 0.2 / 10), not min(geometric, max_span) (mean 4.46)."""

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"masking.{field} = {getattr(self, field)!r}: {why}")

        if not 0.0 < self.probability < 1.0:
            bad("probability", "must be in (0, 1)")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)}")
        for field in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                bad(field, "must be in [0, 1]")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            bad("random_fraction", f"mask_fraction + random_fraction must be <= 1 (mask_fraction = {self.mask_fraction})")
        if not 0.0 < self.span_p <= 1.0:
            bad("span_p", "must be in (0, 1]")
        if self.max_span < 1:
            bad("max_span", "must be >= 1")
