"""The multitask model: the dual tower (open_clip names) plus text heads on its text trunk.

One `forward` serves every branch so that DDP/FSDP wrappers see one call per step:
- image–text: `images` and `tokens` + `eot_index` → normalised features and the logit scale;
- text: `text` (the dict of mmpretrain.data.text.objectives.text_batch) → what the token losses need.
Either may be absent. Loss functions live in mmpretrain.losses; the train step weights and sums them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.data.text.masking import IGNORE_INDEX
from mmpretrain.models.heads import ARHead, MLMHead, SentencePairHead
from mmpretrain.models.text_trunk import pool_at, project_text, text_hidden
from mmpretrain.models.towers import TowerOptions, build_dual_tower, image_tower_locked

MAX_LOGIT_SCALE = math.log(100.0)
TEXT_HEADS = frozenset({"mlm", "ar", "pair"})  # CLIP clamps the learned temperature so that s <= 100


class MultitaskModel(nn.Module):
    def __init__(self, tower: nn.Module, *, mlm: bool = True, ar: bool = True, sentence_pair: bool = False):
        super().__init__()
        self.tower = tower
        width = tower.token_embedding.weight.shape[1]
        vocab = tower.token_embedding.weight.shape[0]
        self.mlm_head = MLMHead(width, vocab) if mlm else None
        self.ar_head = ARHead() if ar else None
        self.pair_head = SentencePairHead(width) if sentence_pair else None

    # ------------------------------------------------------------------ image–text
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        features = self.tower.visual(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, eot_index: Tensor, normalize: bool = True) -> Tensor:
        """CLIP text embedding: causal trunk, pooled at the end-of-text position, projected."""
        hidden = text_hidden(self.tower, tokens, causal=True)  # (B, L, D)
        features = project_text(self.tower, pool_at(hidden, eot_index))  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    # ------------------------------------------------------------------ text branch
    def text_outputs(self, text: dict[str, Tensor], heads: frozenset[str] = TEXT_HEADS) -> dict[str, Tensor]:
        """Outputs of the present heads among `heads` ("mlm", "ar", "pair"; training uses all)."""
        out: dict[str, Tensor] = {}
        embedding = self.tower.token_embedding.weight  # (V, D), the tied decoder
        if self.mlm_head is not None and "mlm" in heads:
            hidden = text_hidden(self.tower, text["mlm_input_ids"], causal=False,
                                 attention_mask=text["attention_mask"])  # (B, L, D)
            selected = text["mlm_labels"] != IGNORE_INDEX  # (B, L)
            out.update(mlm_hidden=self.mlm_head(hidden[selected]),  # (N, D), masked positions only
                       mlm_labels=text["mlm_labels"][selected], mlm_bias=self.mlm_head.bias,
                       decoder_weight=embedding)
        if self.ar_head is not None and "ar" in heads:
            hidden = text_hidden(self.tower, text["ar_input_ids"], causal=True)  # (B, L, D)
            out.update(ar_hidden=self.ar_head(hidden), ar_labels=text["ar_labels"], decoder_weight=embedding)
        if self.pair_head is not None and "pair" in heads:
            if "pair_input_ids" not in text:  # a head without input would get no gradient (and stall DDP)
                raise ValueError("the sentence-pair head needs pair inputs: build text batches with "
                                 "pair_objective='nsp' or 'sop', or build the model with sentence_pair=False")
            segments = self.pair_head.segment_embedding(text["pair_segment_ids"])  # (B, L, D)
            hidden = text_hidden(self.tower, text["pair_input_ids"], causal=False,
                                 attention_mask=text["pair_attention_mask"], extra_embedding=segments)
            out.update(pair_logits=self.pair_head(pool_at(hidden, text["pair_eot_index"])),
                       pair_labels=text["pair_labels"])
        return out

    def forward(self, images: Tensor | None = None, tokens: Tensor | None = None,
                eot_index: Tensor | None = None, text: dict[str, Tensor] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if images is not None:
            out["image_features"] = self.encode_image(images)
        if tokens is not None:
            if eot_index is None:
                raise ValueError("tokens need eot_index: the text embedding is pooled at the end-of-text position")
            out["text_features"] = self.encode_text(tokens, eot_index)
        if images is not None or tokens is not None:
            out["logit_scale"] = self.tower.logit_scale.exp()
            out["logit_bias"] = self.tower.logit_bias
        if text is not None:
            out.update(self.text_outputs(text))
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
                ar: bool = True, sentence_pair: bool = False) -> MultitaskModel:
    """MultitaskModel from a validated model config (mmpretrain.models.load_model_config)."""
    model = MultitaskModel(build_dual_tower(cfg, options), mlm=mlm, ar=ar, sentence_pair=sentence_pair)
    model.clamp_logit_scale_()
    return model
