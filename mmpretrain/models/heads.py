"""Text heads on the shared trunk, and what each predicts. They live outside the dual tower so its
state dict stays open_clip's.

Each head runs the trunk in its own attention mode on its part of a `TextBatch` (`predict`) and returns
a typed prediction that owns its decoding: `TokenPredictions` (vocabulary heads) and
`PairPredictions` (the sentence-pair classifier). Both vocabulary decoders are tied to the token
embedding (Press & Wolf 2017; BERT, GPT-2): the heads hold no (V, D) matrix of their own. The
vocabulary projection happens in the loss (mmpretrain.losses.token_loss) or in `logit_chunks`, in
chunks, because (N, 49410) logits are the largest tensor of the whole step on small machines.

A new head: a module with `name` and `predict(tower, text)`, registered in TEXT_HEADS below and as a
`Heads` flag, plus its loss in mmpretrain.losses.objective.OBJECTIVES and its config switch/weight. A
causal head may also take `captions` (a `CausalPass`) and reuse the contrastive branch's states.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.data.records import IGNORE_INDEX, TextBatch
from mmpretrain.models.text_trunk import pool_at, text_hidden, used_columns


@dataclass(frozen=True)
class Heads:
    """Which text heads a model carries."""

    mlm: bool = False
    ar: bool = False
    sentence_pair: bool = False

    def any(self) -> bool:
        return any(vars(self).values())

    def names(self) -> list[str]:
        """The TEXT_HEADS names of the heads that are on, in registry order."""
        return [name for name in TEXT_HEADS if getattr(self, _FLAGS.get(name, name))]

    @classmethod
    def of(cls, model_cfg) -> Heads:
        """The heads a training config's `model` section turns on: `model.NAME` per head (true/false;
        sentence_pair names its task, null = off)."""
        return cls(**{f.name: bool(getattr(model_cfg, f.name)) for f in fields(cls)})


@dataclass
class TokenPredictions:
    """A vocabulary head's output at the positions it predicts."""

    hidden: Tensor  # (N, D) inputs of the tied decoder, predicted positions only
    labels: Tensor  # (N,) target ids
    decoder_weight: Tensor  # (V, D) the token embedding
    bias: Tensor | None = None  # (V,)

    def logit_chunks(self, size: int = 2048) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits (n, V) float32, labels (n,)) for `size` positions at a time (evaluation)."""
        weight = self.decoder_weight.float()
        bias = None if self.bias is None else self.bias.float()
        for start in range(0, len(self.hidden), size):
            h = self.hidden[start:start + size].float()  # (n, D)
            yield F.linear(h, weight, bias), self.labels[start:start + size]  # (n, V)


@dataclass
class CausalPass:
    """The causal trunk's states over the captions, from the contrastive branch's forward. When the
    text branch learns from those captions, the AR head reads them instead of running the trunk again
    (CoCa: one forward, two losses); same inputs, same mode, so the same states and gradients."""

    ids: Tensor  # (B, n) caption token ids, the batch's used columns (text_trunk.used_columns)
    hidden: Tensor  # (B, n, D) text_hidden(tower, ids, causal=True)

    def reads(self, ids: Tensor) -> bool:
        """Whether `ids` are exactly the ids this pass ran on."""
        return ids.shape == self.ids.shape and ids.device == self.ids.device and torch.equal(ids, self.ids)


@dataclass
class PairPredictions:
    """The sentence-pair classifier's output."""

    logits: Tensor  # (B, 2)
    labels: Tensor  # (B,) 1 = true order / continuation


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

    name = "mlm"

    def forward(self, hidden: Tensor) -> Tensor:
        """(N, D) states at masked positions → (N, D) inputs of the tied decoder."""
        return self.norm(self.act(self.dense(hidden)))

    def predict(self, tower: nn.Module, text: TextBatch) -> TokenPredictions:
        n = used_columns(text.attention_mask, text.mlm_labels != IGNORE_INDEX)  # the rest is padding
        labels = text.mlm_labels[:, :n]
        hidden = text_hidden(tower, text.mlm_input_ids[:, :n], causal=False,
                             attention_mask=text.attention_mask[:, :n])  # (B, n, D)
        selected = labels != IGNORE_INDEX  # (B, n)
        return TokenPredictions(self(hidden[selected]), labels[selected],  # (N, D), (N,)
                                tower.token_embedding.weight, self.bias)


class ARHead(nn.Module):
    """Next-token decoder tied to the token embedding: logits = h · Eᵀ. It has no parameters of its
    own; it exists so the text heads are uniform and so a checkpoint says the AR objective was on."""

    name = "ar"

    def __init__(self, width: int, vocab_size: int):  # every head is built as cls(width, vocab_size)
        super().__init__()

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden

    def predict(self, tower: nn.Module, text: TextBatch, captions: CausalPass | None = None) -> TokenPredictions:
        n = used_columns(text.attention_mask, text.ar_labels != IGNORE_INDEX)  # the rest is padding
        ids, labels = text.ar_input_ids[:, :n], text.ar_labels[:, :n]
        if captions is not None and captions.reads(ids):
            hidden = captions.hidden  # the contrastive branch's pass over the same ids: one forward, two losses
        else:
            hidden = text_hidden(tower, ids, causal=True)  # (B, n, D)
        selected = labels != IGNORE_INDEX  # (B, n)
        return TokenPredictions(self(hidden[selected]), labels[selected], tower.token_embedding.weight)


class SentencePairHead(nn.Module):
    """Binary next-sentence (BERT) / sentence-order (ALBERT) classifier on the bidirectional state at
    the end-of-text position, with BERT's tanh pooler. Also owns the segment embedding (A = 0, B = 1)
    that is added to the token embeddings of the pair input; zero-initialised, so the trunk sees
    exactly its usual input at the start."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.segment_embedding = nn.Embedding(2, width)
        nn.init.zeros_(self.segment_embedding.weight)
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, 2)

    name = "pair"

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, D) → (B, 2) logits; class 1 = true continuation / original order."""
        return self.classifier(torch.tanh(self.pooler(pooled)))

    def predict(self, tower: nn.Module, text: TextBatch) -> PairPredictions:
        pairs = text.pairs
        if pairs is None:  # a head without input would get no gradient (and stall DDP)
            raise ValueError("the sentence-pair head needs pair inputs: build text batches with "
                             "pair_objective='nsp' or 'sop', or build the model with sentence_pair=False")
        n = used_columns(pairs.attention_mask)  # the rest is padding
        segments = self.segment_embedding(pairs.segment_ids[:, :n])  # (B, n, D)
        hidden = text_hidden(tower, pairs.input_ids[:, :n], causal=False, attention_mask=pairs.attention_mask[:, :n],
                             extra_embedding=segments)  # (B, n, D)
        return PairPredictions(self(pool_at(hidden, pairs.eot_index)), pairs.labels)


# name -> head class; the model holds each enabled head as the attribute `{name}_head`.
TEXT_HEADS: dict[str, type[nn.Module]] = {"mlm": MLMHead, "ar": ARHead, "pair": SentencePairHead}
_FLAGS = {"pair": "sentence_pair"}  # a Heads field named otherwise than its head (kept for checkpoint.json)
