"""The dual tower: open_clip's `CLIP` (ViT or timm image tower, open_clip text transformer).

We build open_clip's own class rather than a look-alike so the state dict keeps open_clip's parameter
names and shapes by construction: an exported tower loads with `open_clip.create_model(...,
pretrained=FILE)`. Training-time switches (patch dropout, LiT locking, gradient checkpointing) are
options here, not keys of the architecture file: architecture lives in data, training settings in the
training config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from mmpretrain.errors import UserError


@dataclass(frozen=True)
class TowerOptions:
    patch_dropout: float = 0.0
    """Fraction of image patches dropped in training (FLIP, arXiv:2212.00794); 0 = off."""
    lock_image: bool = False
    """Freeze the image tower (LiT, arXiv:2111.07991); it then also stays in eval mode."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave this many last layer groups trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image on a timm CNN: also freeze BatchNorm running statistics."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (both towers), trading ~30% compute for memory."""
    init_logit_bias: float | None = None
    """Add a learnable logit bias with this initial value (SigLIP uses -10)."""
    init_logit_scale: float | None = None
    """Initial log of the logit scale; None = the model config's (open_clip: log(1/0.07)). SigLIP: log(10)."""

    def __post_init__(self):
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout = {self.patch_dropout!r}: must be in [0, 1)")
        if self.lock_image_unlocked_groups < 0:
            raise ValueError(f"lock_image_unlocked_groups = {self.lock_image_unlocked_groups!r}: must be >= 0")


def build_dual_tower(cfg: dict[str, Any], options: TowerOptions = TowerOptions()):
    """open_clip `CLIP` from a validated model config (see model_config.load_model_config)."""
    from open_clip.model import CLIP  # imported here: ~25 s, only paid by code that builds a model

    cfg = copy.deepcopy(cfg)
    cfg.pop("custom_text", None)  # open_clip's switch between CLIP and CustomTextCLIP; we always build CLIP
    if options.patch_dropout:
        cfg["vision_cfg"]["patch_dropout"] = options.patch_dropout
    if options.init_logit_bias is not None:
        cfg["init_logit_bias"] = options.init_logit_bias
    if options.init_logit_scale is not None:
        cfg["init_logit_scale"] = options.init_logit_scale
    try:
        tower = CLIP(**cfg)
    except (TypeError, RuntimeError) as exc:  # e.g. a timm model without patch dropout, an unknown timm name
        raise UserError(f"cannot build the model from its config: {exc}") from None
    _check_timm_input_size(tower, cfg["vision_cfg"])
    if options.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    if options.lock_image:
        tower.lock_image_tower(unlocked_groups=options.lock_image_unlocked_groups,
                               freeze_bn_stats=options.lock_image_freeze_bn_stats)
    return tower


def _check_timm_input_size(tower, vision_cfg: dict[str, Any]) -> None:
    # open_clip builds timm trunks at their default input size. CNNs take any size, but fixed-size
    # trunks (ViTs with a positional embedding) would fail at the first forward; say so up front.
    trunk = getattr(tower.visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "set_input_size"):
        return
    default = tuple(trunk.pretrained_cfg.get("input_size", (3, 0, 0))[1:])
    size = vision_cfg.get("image_size", 224)
    wanted = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if default and wanted != default:
        raise UserError(f"timm model {vision_cfg['timm_model_name']} takes {default[0]}x{default[1]} images, "
                        f"vision_cfg.image_size is {size}: set image_size to {default[0]}")


def image_tower_locked(tower) -> bool:
    """True when no image-tower parameter is trainable (LiT)."""
    return not any(p.requires_grad for p in tower.visual.parameters())
