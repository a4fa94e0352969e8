"""The training configuration: `schema` (typed sections, Literal choices) and `load` (YAML + dotted
overrides, validated once, saved with every run)."""

from mmpretrain.config.load import (
    COMMAND_LINE,
    config_to_dict,
    load_config,
    require_training_data,
    save_config,
    sections_off,
    validate_config,
)
from mmpretrain.config.schema import (
    Config,
    Contrastive,
    DataConfig,
    DataMode,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    MaskingConfig,
    MaskStrategy,
    ModelConfig,
    OptimConfig,
    PairObjective,
    Positives,
    Precision,
    ScheduleConfig,
    ScheduleName,
    TrainConfig,
    choices,
)

__all__ = ["COMMAND_LINE", "Config", "Contrastive", "DataConfig", "DataMode", "EvalConfig", "LoggingConfig",
           "LossConfig", "MaskStrategy", "MaskingConfig", "ModelConfig", "OptimConfig", "PairObjective",
           "Positives", "Precision", "ScheduleConfig", "ScheduleName", "TrainConfig", "choices", "config_to_dict",
           "load_config", "require_training_data", "save_config", "sections_off", "validate_config"]
