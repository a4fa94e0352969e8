"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, arXiv:2303.15343).

Every image–text pair is an independent binary problem, so there is no softmax over the batch.
Across processes this rank's images are scored against every rank's texts (gathered with
gradient) instead of open_clip's neighbour exchange: the same sum, in one collective that gloo has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.losses.collectives import all_gather_with_grad
from mmpretrain.losses.contrastive import as_scalar, check_pairs, compute_dtype
from mmpretrain.runtime import gather_sizes, rank_and_world

# The paper's (and open_clip's siglip configs') start: s = 10, b = -10, so that at initialisation the
# many negatives do not swamp the loss (section 3.2).
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
) -> dict[str, Tensor]:
    """−Σ_ij log σ(z_ij (s·⟨I_i, T_j⟩ + b)) / n, z = +1 for pairs, −1 otherwise (open_clip's SigLipLoss).

    image_features, text_features: (n, d) local features, row i of each a pair. logit_scale is
    the multiplier s (already exp'd), logit_bias the b. Under torch.distributed, rank r scores
    its n images against all B texts (its pairs offset by earlier ranks' sizes) and divides by
    its own n; with equal local batches the mean over ranks is the full-batch loss.

    Returns {"loss", "pos_prob", "neg_prob"}: the latter two (detached) are the mean sigmoid
    probability given to the positive pairs and to the negative pairs this rank scored.
    """
    check_pairs(image_features, text_features, "siglip_loss")
    dtype = compute_dtype(image_features)
    img, txt = image_features.to(dtype), text_features.to(dtype)
    scale = as_scalar(logit_scale, img, "logit_scale").reshape(())
    bias = as_scalar(logit_bias, img, "logit_bias").reshape(())
    rank, _ = rank_and_world()
    sizes = gather_sizes(img.shape[0], img.device)
    all_txt = all_gather_with_grad(txt, sizes)  # (B, d)
    n, total = img.shape[0], all_txt.shape[0]
    logits = scale * img @ all_txt.T + bias  # (n, B)
    rows = torch.arange(n, device=img.device)
    is_pos = torch.zeros_like(logits, dtype=torch.bool)
    is_pos[rows, rows + sum(sizes[:rank])] = True
    signs = torch.where(is_pos, 1.0, -1.0).to(dtype)  # (n, B)
    loss = -F.logsigmoid(signs * logits).sum() / n
    with torch.no_grad():
        prob = torch.sigmoid(logits)
        pos_prob = prob[is_pos].sum() / max(n, 1)
        neg_prob = prob[~is_pos].sum() / max(n * (total - 1), 1)
    return {"loss": loss, "pos_prob": pos_prob, "neg_prob": neg_prob}
