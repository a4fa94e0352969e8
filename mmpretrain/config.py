"""The training configuration: typed sections, one docstring per field (STYLE 3).

`load_config(path, overrides)` reads YAML, applies `section.key=value` overrides, and validates
once: unknown keys and wrong types are errors naming the dotted key. The resolved config is saved
in the run directory and in every checkpoint (`config_to_dict`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from mmpretrain.data.masking_config import MaskingConfig
from mmpretrain.errors import UserError
from mmpretrain.fileio import atomic_write


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Architecture: a configs/models name, a model-config .json path, or an open_clip built-in name."""
    pretrained: str | None = None
    """open_clip weights (.safetensors/.pt/.bin) to start from; None = random init."""
    mlm: bool = True
    """Masked-LM head on the bidirectional text trunk."""
    ar: bool = True
    """Autoregressive (next-token) head on the causal text trunk."""
    sentence_pair: str | None = None
    """None, "nsp" or "sop": a sentence-pair head trained on the text batches."""
    patch_dropout: float = 0.0
    """Fraction of image patches dropped in training (FLIP); 0 = off."""
    lock_image: bool = False
    """Freeze the image tower (LiT)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave this many last layer groups trainable."""
    grad_checkpointing: bool = False
    """Recompute activations in backward, trading compute for memory."""
    compile: bool = False
    """torch.compile the model."""


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)
    """Image-text shard patterns (brace/glob patterns, folders, or `pipe:` URLs) for training."""
    train_weights: list[float] | None = None
    """Per-pattern sampling weights (resampled mode); None = equal."""
    text_shards: list[str] = field(default_factory=list)
    """Text-only shard patterns for the MLM/AR branch; empty = learn the text branch from captions."""
    batch_size: int = 64
    """Image-text pairs per process per micro-batch (global batch = batch_size x processes x accum_steps)."""
    text_batch_size: int = 64
    """Text documents per process per micro-batch (with text_shards)."""
    mode: str = "resampled"
    """"resampled" (shards drawn with replacement, step-based runs) or "epoch" (each sample once per epoch)."""
    samples_per_epoch: int | None = None
    """Resampled mode: length of a virtual epoch (for the epoch count); None = all samples."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer of each worker."""
    num_workers: int = 2
    """DataLoader workers per process; exact resume needs the same number."""
    context_length: int = 77
    """Tokens per text, <start> and <end> included; must not exceed the model's context length."""
    augmentation: dict = field(default_factory=dict)
    """open_clip AugmentationCfg fields for training images (scale, color_jitter, ...)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """How MLM inputs are corrupted."""


@dataclass
class LossConfig:
    contrastive: str = "clip"
    """"clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid)."""
    tile_size: int | None = None
    """InfoNCE in tiles of this many rows (never the full logits matrix); None = plain."""
    local_loss: bool = False
    """InfoNCE: each process scores only its own rows against all (O(n x B) logits)."""
    clip_weight: float = 1.0
    """Weight of the contrastive loss."""
    mlm_weight: float = 1.0
    """Weight of the masked-LM loss (when the head is on)."""
    ar_weight: float = 1.0
    """Weight of the next-token loss (when the head is on)."""
    pair_weight: float = 1.0
    """Weight of the sentence-pair loss (when the head is on)."""
    token_chunk_size: int = 2048
    """Predicted tokens decoded at a time by the MLM/AR losses (memory: chunk x vocab)."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """AdamW weight decay; never applied to biases, norms, the temperature, or any 1-D parameter."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""
    fused: bool = True
    """torch's fused AdamW kernel (one pass over each parameter, on CPU, CUDA and the other devices torch
    has it for); on CPU the tiny model's update takes 8 ms instead of 48 ms with torch's default per-tensor
    loop. false = torch's default (a loop on CPU, foreach on CUDA). Same update up to float rounding."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """"cosine" (decay to min_lr_ratio x lr) or "constant" (after warmup)."""
    warmup_steps: int = 100
    """Linear warmup from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor, as a fraction of the peak learning rate."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the run."""
    accum_steps: int = 1
    """Micro-batches per optimizer step; contrastive accumulation is exact (features cached, recomputed)."""
    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" (mixed precision through Accelerate)."""
    seed: int = 0
    """Seeds model init, data order, masking and augmentation."""
    output_dir: str = "runs/run"
    """Run directory: config.yaml, checkpoints/, metrics.jsonl, tracker logs."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the last this many checkpoints."""
    resume: str | None = None
    """None, "latest" (the run directory's newest checkpoint), or a checkpoint path."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many steps (and at the end); 0 = never during training."""
    retrieval_shards: list[str] = field(default_factory=list)
    """Held-out image-text shards for retrieval."""
    zeroshot_shards: list[str] = field(default_factory=list)
    """Labelled image shards (KEY.cls) for zero-shot classification."""
    classnames: str | None = None
    """Class-name file for zero-shot; None = the shards' dataset.json."""
    templates: str | None = None
    """Prompt-template file for zero-shot; None = the built-in set."""
    text_shards: list[str] = field(default_factory=list)
    """Held-out text shards for MLM accuracy and AR perplexity."""
    batch_size: int = 256
    """Evaluation batch size per process."""
    max_samples: int | None = None
    """Evaluate on at most this many samples per task (periodic evaluation cost); None = all."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Log metrics every this many steps."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers: "tensorboard", "wandb", ... (metrics.jsonl is always written)."""
    project: str = "mmpretrain"
    """Tracker project name (wandb)."""
    progress: bool = True
    """Progress bar on the main process."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------- loading and validation
COMMAND_LINE = "command line"
_NONE = type(None)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, except that `1e-3` is a float: PyYAML follows YAML 1.1, which wants `1.0e-3`
    and would read `lr: 1e-3` as the string "1e-3"."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides; validated once."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    tree, sources = config_to_dict(Config()), {}
    if path is not None:
        _merge(tree, _read_yaml(Path(path)), Config, "", str(path), sources)
    _check_repeats(overrides)
    for item in overrides:
        _merge(tree, _parse_override(item), Config, "", COMMAND_LINE, sources)
    cfg = _build(tree, sources)
    validate_config(cfg, sources)
    return cfg


def _check_repeats(overrides: Sequence[str]) -> None:
    """A list-valued key (shard patterns) given twice is an error: an unquoted brace pattern
    (data.train_shards=a/{000..009}.tar) is expanded by the shell into one override per shard, and
    "the last one wins" would train on the last shard only. Other keys: the last one wins."""
    counts: dict[str, int] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        if n > 1 and _is_list_field(key):
            raise UserError(f"{COMMAND_LINE}: {key} is given {n} times; give it once (a brace pattern must be "
                            f"quoted, e.g. {key}='a/{{000..009}}.tar', or the shell expands it into one "
                            "argument per file)")


def _is_list_field(key: str) -> bool:
    cls: Any = Config
    for part in key.split("."):
        hint = _hints(cls).get(part) if is_dataclass(cls) else None
        if hint is None:
            return False
        cls = hint
    return get_origin(cls) is list or any(get_origin(a) is list for a in get_args(cls))


def config_from_dict(d: Mapping[str, Any], source: str = "checkpoint") -> Config:
    """A config from plain data (a checkpoint's copy); missing keys take their defaults."""
    tree, sources = config_to_dict(Config()), {}
    _merge(tree, d, Config, "", source, sources)
    cfg = _build(tree, sources)
    validate_config(cfg, sources)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars), sections and keys in declaration order."""
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))


def masking_config(cfg: Config) -> MaskingConfig:
    """The data.masking section (already a validated MaskingConfig)."""
    return cfg.data.masking


def require_training_data(cfg: Config) -> None:
    """Training needs image-text shards; configs for evaluation or tests may leave them out."""
    if not cfg.data.train_shards:
        raise UserError("data.train_shards is empty: give image-text shard patterns in the config or on "
                        "the command line, e.g. data.train_shards='[\"shards/NAME/train\"]'")


def _at_least(low):
    return (lambda v: v is None or v >= low), f"must be >= {low}"


def _one_of(*choices):
    return (lambda v: v in choices), "must be one of " + ", ".join("null" if c is None else c for c in choices)


_POSITIVE = (lambda v: v is None or v > 0), "must be > 0"
_FRACTION = (lambda v: 0 <= v < 1), "must be in [0, 1)"
_NON_EMPTY = (lambda v: v != ""), "must not be empty"

# Value rules the types cannot express. `None` passes the numeric rules: the type check allowed it
# exactly where a field may be None.
_RULES: list[tuple[tuple[str, ...], tuple[Callable[[Any], bool], str]]] = [
    (("data.batch_size", "data.text_batch_size", "data.samples_per_epoch", "loss.tile_size",
      "loss.token_chunk_size", "train.steps", "train.accum_steps", "train.keep_checkpoints",
      "eval.batch_size", "eval.max_samples", "logging.log_every"), _at_least(1)),
    (("model.lock_image_unlocked_groups", "data.shuffle_buffer", "data.num_workers", "loss.clip_weight",
      "loss.mlm_weight", "loss.ar_weight", "loss.pair_weight", "optim.weight_decay", "schedule.warmup_steps",
      "train.checkpoint_every", "eval.every"), _at_least(0)),
    (("data.context_length",), _at_least(3)),  # <start>, one token, <end>
    (("optim.lr", "optim.eps", "optim.grad_clip"), _POSITIVE),
    (("model.patch_dropout", "optim.beta1", "optim.beta2"), _FRACTION),
    (("schedule.min_lr_ratio",), ((lambda v: 0 <= v <= 1), "must be in [0, 1]")),
    (("model.name", "train.output_dir"), _NON_EMPTY),
    (("train.resume",), ((lambda v: v != ""), 'must be null, "latest" or a checkpoint path')),
    (("model.sentence_pair",), _one_of(None, "nsp", "sop")),
    (("data.mode",), _one_of("resampled", "epoch")),
    (("loss.contrastive",), _one_of("clip", "siglip")),
    (("schedule.name",), _one_of("cosine", "constant")),
    (("train.precision",), _one_of("fp32", "bf16", "fp16")),
]


def validate_config(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Value rules that types cannot express; `sources` maps dotted keys to where they were set."""
    sources = sources or {}

    def fail(key: str, why: str):
        value = _get(cfg, key)
        where = f"{sources[key]}: " if key in sources else ""
        raise UserError(f"{where}{key} = {value!r}: {why}")

    for keys, (ok, why) in _RULES:
        for key in keys:
            if not ok(_get(cfg, key)):
                fail(key, why)
    data = cfg.data
    if data.train_weights is not None:
        if len(data.train_weights) != len(data.train_shards):
            fail("data.train_weights", f"needs one weight per data.train_shards pattern ({len(data.train_shards)})")
        if any(w <= 0 for w in data.train_weights):
            fail("data.train_weights", "weights must be > 0")
        if data.mode != "resampled":
            fail("data.train_weights", "weights only apply to data.mode = resampled; remove them or change the mode")
    if cfg.loss.local_loss and cfg.loss.contrastive != "clip":
        fail("loss.local_loss", "only loss.contrastive = clip has a local form; set it to false")


def _build(tree: Mapping[str, Any], sources: Mapping[str, str]) -> Config:
    """The dataclasses from checked plain data; MaskingConfig validates itself on construction."""
    try:
        return _instantiate(Config, tree)
    except ValueError as err:  # MaskingConfig: "masking.X = value: why"
        key = "data." + str(err).split(" ", 1)[0]
        where = f"{sources[key]}: " if key in sources else ""
        raise UserError(f"{where}data.{err}") from None


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path}: no such file (see configs/train/ for recipes)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path}: cannot read it ({err})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}: not valid YAML ({_yaml_problem(err)})") from None
    return {} if raw is None else raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def _parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as YAML (`null`, `[x, y]`, `1e-3`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise UserError(f"command line: {item!r} is not an override; write section.key=value, e.g. train.steps=100")
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"command line: {item!r}: the key must be section.key (dotted), e.g. optim.lr=1e-3")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise UserError(f"command line: {key}={text}: the value is not valid YAML ({_yaml_problem(err)}); "
                        f"quote strings with special characters, e.g. {key}='[\"a/{{0..9}}.tar\"]'") from None
    for part in reversed(parts):
        value = {part: value}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)  # the annotations are strings (from __future__ import annotations)
    return {f.name: hints[f.name] for f in fields(cls)}


def _merge(tree: dict, raw: Any, cls: type, prefix: str, source: str, sources: dict[str, str]) -> None:
    """Check `raw` (YAML data) against dataclass `cls` and write it into `tree`, a config_to_dict tree."""
    if not isinstance(raw, Mapping):
        what = prefix.rstrip(".") or "the file's top level"
        raise UserError(f"{source}: {what} must be a mapping of keys, got {_show(raw)}")
    hints = _hints(cls)
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints:
            kind = "key" if prefix else "section"
            raise UserError(f"{source}: unknown {kind} {name!r}; {_suggest(str(key), hints, prefix)}")
        hint = hints[key]
        if is_dataclass(hint):
            _merge(tree[key], value, hint, f"{name}.", source, sources)
            continue
        try:
            value = _coerce(value, hint)
        except _Mismatch:
            raise UserError(f"{source}: {name} = {_show(value)}: expected {_describe(hint)}") from None
        # A free-form mapping (augmentation) is updated key by key, so `data.augmentation.scale=...` works.
        tree[key] = {**tree[key], **value} if hint is dict else value
        sources[name] = source


def _suggest(key: str, hints: dict[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(hints), n=1)
    if close:
        return f"did you mean {prefix + close[0]!r}?"
    if prefix.count(".") == 1:  # a key put in the wrong section: train.lr -> optim.lr
        moved = [f"{s}.{key}" for s, h in _hints(Config).items() if key in _hints(h)]
        if moved:
            return f"did you mean {moved[0]!r}?"
    return f"valid {'keys' if prefix else 'sections'}: {', '.join(hints)}"


class _Mismatch(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (an int is a float, a string is a one-item list of strings) or _Mismatch."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None and _NONE in args:
            return None
        for arg in (a for a in args if a is not _NONE):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is list:
        if isinstance(value, str) and args[0] is str:  # one shard pattern: `train_shards: a/{0..9}.tar`
            return [value]
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value]
    if hint is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str):
        if type(value) is not hint:  # exact: True is not an int here, 1 is not a bool
            raise _Mismatch
        return value
    raise NotImplementedError(f"config annotation {hint!r} has no type check")


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), dict: ("a mapping", "mappings")}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_describe(a) for a in args if a is not _NONE) + (" or null" if _NONE in args else "")
    if origin is list:
        return f"a list of {_NAMES[args[0]][1]}"
    return _NAMES[hint][0]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _instantiate(cls: type, tree: Mapping[str, Any]) -> Any:
    return cls(**{k: _instantiate(h, tree[k]) if is_dataclass(h) else tree[k] for k, h in _hints(cls).items()})
