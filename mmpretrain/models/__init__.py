"""Dual tower (open_clip CLIP), one text trunk in causal and bidirectional modes, tied text heads."""

from mmpretrain.models.model_config import load_model_config, shipped_configs
from mmpretrain.models.multitask import MultitaskModel, build_model
from mmpretrain.models.towers import TowerOptions, build_dual_tower
from mmpretrain.models.weights import LoadReport, load_open_clip_weights

__all__ = ["LoadReport", "MultitaskModel", "TowerOptions", "build_dual_tower", "build_model",
           "load_model_config", "load_open_clip_weights", "shipped_configs"]
