"""One text trunk (open_clip's text transformer inside the dual tower), two attention modes.

* causal: CLIP's own mode. Position i sees positions <= i, so the end-of-text state summarises the
  caption (the contrastive text embedding) and every position can predict the next token (AR head).
* bidirectional: every real token sees every real token, padding is masked out as a key (MLM and
  sentence-pair heads). open_clip's `no_causal_mask=True` alone would let tokens attend to padding
  (measured: the outputs change with the amount of padding), so the padding mask is built here from the true lengths: padding id 0 is also
  the real token "!", so it cannot be found by value.

Both modes run the same modules with the same weights; only the attention mask differs.

Callers run the trunk on the batch's used columns only (`used_columns`): tokenizers pad every text
to the context length (CLIP's 77), and a caption of 12 tokens would otherwise cost the trunk 77
positions. The columns past the longest text are padding in every row, and no real position reads
them (a causal position sees only earlier ones; a bidirectional one sees padding only as a masked
key), so the states at every real position are the same, and so are the losses and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def text_hidden(tower: nn.Module, ids: Tensor, *, causal: bool, attention_mask: Tensor | None = None,
                extra_embedding: Tensor | None = None) -> Tensor:
    """(B, L, width) token states after the final LayerNorm.

    `attention_mask` (B, L) bool marks real tokens; bidirectional mode requires it. `extra_embedding`
    (B, L, width) is added to the token embeddings (sentence-pair segment embeddings).
    """
    length = ids.shape[1]
    if length > tower.positional_embedding.shape[0]:
        raise ValueError(f"text of {length} tokens exceeds the model's context_length "
                         f"{tower.positional_embedding.shape[0]}; tokenize with that context length")
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast_dtype)  # (B, L, D)
    if extra_embedding is not None:
        x = x + extra_embedding.to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    if causal:
        mask = tower.attn_mask[:length, :length]  # (L, L) additive, -inf above the diagonal
    else:
        if attention_mask is None:
            raise ValueError("bidirectional mode needs attention_mask (B, L) marking the real tokens")
        mask = padding_mask(attention_mask, heads(tower), x.dtype)  # (B * H, L, L)
    x = tower.transformer(x, attn_mask=mask)
    return tower.ln_final(x)  # (B, L, D)


def used_columns(*masks: Tensor) -> int:
    """How many leading columns of a (B, L) batch hold every True of the (B, L) bool `masks` (real
    tokens, predicted positions): the trunk runs on that prefix. At least 1."""
    used = masks[0].any(0)
    for mask in masks[1:]:
        used = used | mask.any(0)
    columns = used.nonzero()
    return int(columns.max()) + 1 if columns.numel() else 1


def padding_mask(attention_mask: Tensor, num_heads: int, dtype: torch.dtype) -> Tensor:
    """(B * H, L, L) additive mask: 0 where the key is a real token, -inf where it is padding."""
    batch, length = attention_mask.shape
    additive = torch.zeros(batch, 1, 1, length, dtype=dtype, device=attention_mask.device)
    additive.masked_fill_(~attention_mask[:, None, None, :], float("-inf"))  # (B, 1, 1, L)
    # nn.MultiheadAttention takes a 3-D mask as (B * H, Lq, Lk), batch-major.
    return additive.expand(batch, num_heads, length, length).reshape(batch * num_heads, length, length)


def heads(tower: nn.Module) -> int:
    return tower.transformer.resblocks[0].attn.num_heads


def project_text(tower: nn.Module, pooled: Tensor) -> Tensor:
    """(B, width) pooled states → (B, embed_dim) through open_clip's text projection."""
    projection = tower.text_projection
    if projection is None:
        return pooled
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled @ projection


def pool_at(hidden: Tensor, index: Tensor) -> Tensor:
    """(B, L, D) states → (B, D) at one position per row (the end-of-text token)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
