"""The multitask model: the dual tower (open_clip names) plus text heads on its text trunk.

One `forward` serves every branch so that DDP/FSDP wrappers see one call per step:
- image–text: `images` and `tokens` + `eot_index` → normalised features and the logit scale;
- text: a `TextBatch` → one prediction per enabled head (mmpretrain.models.heads).
Either may be absent. When the text batch is made from the captions of the image–text batch, the AR
head reads the contrastive branch's causal pass instead of running the trunk a second time. It
returns a `ModelOutput`; loss functions live in mmpretrain.losses and the objective
(mmpretrain.losses.objective) weights and sums them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.data.records import TextBatch
from mmpretrain.models.heads import TEXT_HEADS, ARHead, CausalPass, Heads, PairPredictions, TokenPredictions
from mmpretrain.models.text_trunk import pool_at, project_text, text_hidden, used_columns
from mmpretrain.models.towers import TowerOptions, build_dual_tower, image_tower_locked

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature so that s <= 100


@dataclass
class ModelOutput:
    image_features: Tensor | None = None  # (B, E) normalised
    text_features: Tensor | None = None  # (B, E) normalised
    logit_scale: Tensor | None = None  # s = exp(learned), a scalar
    logit_bias: Tensor | None = None  # SigLIP's bias, None for CLIP towers
    text: dict[str, TokenPredictions | PairPredictions] = field(default_factory=dict)  # by head name


class MultitaskModel(nn.Module):
    def __init__(self, tower: nn.Module, heads: Heads = Heads(mlm=True, ar=True)):
        super().__init__()
        self.tower = tower
        self.heads = heads
        vocab, width = tower.token_embedding.weight.shape
        for name in TEXT_HEADS:  # attributes `mlm_head`, ... keep the state-dict names of exports
            setattr(self, f"{name}_head", TEXT_HEADS[name](width, vocab) if name in heads.names() else None)

    def text_head(self, name: str) -> nn.Module | None:
        return getattr(self, f"{name}_head")

    # ------------------------------------------------------------------ image–text
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        features = self.tower.visual(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, eot_index: Tensor, normalize: bool = True) -> Tensor:
        """CLIP text embedding: causal trunk, pooled at the end-of-text position, projected."""
        return self._text_features(self._caption_pass(tokens, eot_index), eot_index, normalize)

    def _caption_pass(self, tokens: Tensor, eot_index: Tensor) -> CausalPass:
        """The causal trunk over the captions up to the last end-of-text (the columns after it are
        padding in every row): the contrastive embedding's pass, which the AR head may reuse."""
        ids = tokens[:, :used_columns(torch.arange(tokens.shape[1], device=tokens.device) <= eot_index[:, None])]
        return CausalPass(ids, text_hidden(self.tower, ids, causal=True))  # (B, n), (B, n, D) states

    def _text_features(self, captions: CausalPass, eot_index: Tensor, normalize: bool = True) -> Tensor:
        features = project_text(self.tower, pool_at(captions.hidden, eot_index))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    # ------------------------------------------------------------------ text branch
    def text_predictions(self, text: TextBatch, names: Iterable[str] | None = None,
                         captions: CausalPass | None = None) -> dict[str, TokenPredictions | PairPredictions]:
        """Predictions of the enabled heads among `names` (None: all of them; training uses all).
        `captions`: the contrastive branch's causal pass, which the AR head reuses when `text` is
        those captions."""
        wanted = self.heads.names() if names is None else [n for n in self.heads.names() if n in set(names)]
        return {name: self._predict(name, text, captions) for name in wanted}

    def _predict(self, name: str, text: TextBatch, captions: CausalPass | None):
        head = self.text_head(name)
        if captions is not None and isinstance(head, ARHead):
            return head.predict(self.tower, text, captions)
        return head.predict(self.tower, text)

    def forward(self, images: Tensor | None = None, tokens: Tensor | None = None,
                eot_index: Tensor | None = None, text: TextBatch | None = None) -> ModelOutput:
        out = ModelOutput()
        captions = None
        if images is not None:
            out.image_features = self.encode_image(images)
        if tokens is not None:
            if eot_index is None:
                raise ValueError("tokens need eot_index: the text embedding is pooled at the end-of-text position")
            captions = self._caption_pass(tokens, eot_index)
            out.text_features = self._text_features(captions, eot_index)
        if images is not None or tokens is not None:
            out.logit_scale = self.tower.logit_scale.exp()
            out.logit_bias = self.tower.logit_bias
        if text is not None:
            out.text = self.text_predictions(text, captions=captions)
        return out

    # ------------------------------------------------------------------ training-time behaviour
    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep s = exp(logit_scale) in [1, 100], as CLIP does after every optimizer step. Clamping
        the parameter (not the forward value) keeps its gradient alive at the boundary."""
        self.tower.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and image_tower_locked(self.tower):
            self.tower.visual.eval()  # LiT: a frozen tower also keeps dropout/BatchNorm in eval mode
        return self

    def export_state_dict(self) -> dict[str, Tensor]:
        """The dual tower's weights under open_clip's names (heads excluded)."""
        return self.tower.state_dict()


def build_model(cfg: dict[str, Any], options: TowerOptions = TowerOptions(), *, mlm: bool = True,
                ar: bool = True, sentence_pair: bool = False, heads: Heads | None = None) -> MultitaskModel:
    """MultitaskModel from a validated model config (mmpretrain.models.load_model_config); `heads`, when
    given, replaces the three flags."""
    heads = heads if heads is not None else Heads(mlm=mlm, ar=ar, sentence_pair=sentence_pair)
    model = MultitaskModel(build_dual_tower(cfg, options), heads)
    model.clamp_logit_scale_()
    return model
