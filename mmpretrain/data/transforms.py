"""Image transforms derived from the model's image size, mean and std, as open_clip builds them:
train = RandomResizedCrop (+ optional augmentation config), eval = resize + centre crop."""

from __future__ import annotations

from collections.abc import Callable

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform


def image_transforms(
    image_size: int,
    train: bool,
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
    std: tuple[float, ...] = OPENAI_DATASET_STD,
    augmentation: dict | None = None,
) -> Callable:
    """`augmentation` takes open_clip's AugmentationCfg fields (scale, ratio, color_jitter, ...)."""
    return image_transform(image_size, is_train=train, mean=mean, std=std, aug_cfg=augmentation or {})
