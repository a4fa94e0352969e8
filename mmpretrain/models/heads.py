"""Text heads on the shared trunk. They live outside the dual tower so its state dict stays open_clip's.

Both vocabulary decoders are tied to the token embedding (Press & Wolf 2017; BERT, GPT-2): the
heads hold no (V, D) matrix of their own, the caller passes `tower.token_embedding.weight`. The
vocabulary projection itself happens in the loss (mmpretrain.losses.token_loss), in chunks, because
(N, 49410) logits are the largest tensor of the whole step on small machines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Heads:
    """Which text heads a model carries."""

    mlm: bool = False
    ar: bool = False
    sentence_pair: bool = False

    def any(self) -> bool:
        return self.mlm or self.ar or self.sentence_pair


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the tied decoder plus a vocabulary bias.

    Applied only to the masked positions the caller selects: no logits exist for unmasked tokens.
    """

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.dense.weight, std=width ** -0.5)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(N, D) states at masked positions → (N, D) inputs of the tied decoder."""
        return self.norm(self.act(self.dense(hidden)))

    def logits(self, hidden: Tensor, embedding: Tensor) -> Tensor:
        """(N, V) vocabulary logits, for evaluation and inspection (training uses the chunked loss)."""
        return self(hidden) @ embedding.T + self.bias


class ARHead(nn.Module):
    """Next-token decoder tied to the token embedding: logits = h · Eᵀ. It has no parameters of its
    own; it exists so the text heads are uniform and so a checkpoint says the AR objective was on."""

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden

    def logits(self, hidden: Tensor, embedding: Tensor) -> Tensor:
        return self(hidden) @ embedding.T


class SentencePairHead(nn.Module):
    """Binary next-sentence (BERT) / sentence-order (ALBERT) classifier on the bidirectional state at
    the end-of-text position, with BERT's tanh pooler. Also owns the segment embedding (A = 0, B = 1)
    that is added to the token embeddings of the pair input; zero-initialised, so the trunk sees
    exactly its usual input at the start."""

    def __init__(self, width: int):
        super().__init__()
        self.segment_embedding = nn.Embedding(2, width)
        nn.init.zeros_(self.segment_embedding.weight)
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, D) → (B, 2) logits; class 1 = true continuation / original order."""
        return self.classifier(torch.tanh(self.pooler(pooled)))
