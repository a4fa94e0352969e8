"""Loading the training configuration: defaults, then a YAML file, then `section.key=value`
overrides, validated once. Unknown keys and wrong types (a `Literal` choice included) are errors
naming the dotted key; the resolved config is saved in the run directory and in every checkpoint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mmpretrain.config.schema import Config
from mmpretrain.errors import UserError
from mmpretrain.storage import write_bytes

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


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars), sections and keys in declaration order."""
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML atomically: a reader sees the old file or the new one, never half of one."""
    write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))


def require_training_data(cfg: Config) -> None:
    """Training needs image-text shards; configs for evaluation or tests may leave them out."""
    if not cfg.data.train_shards:
        raise UserError("data.train_shards is empty: set it in the config or on the command line to a folder "
                        "from `mmpretrain prepare`, e.g. data.train_shards=shards/NAME/train, or to patterns, "
                        "e.g. data.train_shards='[\"shards/NAME/train/NAME-{000000..000009}.tar\"]'")


def sections_off(cfg: Config) -> list[str]:
    """What this config leaves off, each with how to turn it on (printed once when training starts)."""
    off, e = [], cfg.eval
    if not (cfg.model.mlm or cfg.model.ar):
        off.append("text branch (model.mlm=false, model.ar=false): set model.mlm=true / model.ar=true")
    elif not cfg.data.text_shards:
        off.append("text corpus (data.text_shards is empty, so the MLM/AR heads learn from the training captions): "
                   "set data.text_shards='[\"shards/CORPUS/train\"]' (mmpretrain prepare FILES --text-only)")
    tasks = {"retrieval": e.retrieval_shards, "zeroshot": e.zeroshot_shards, "text": e.text_shards}
    if not e.every or not any(tasks.values()):
        off.append("periodic eval (eval.every=0 or no eval shards): set eval.every=N and eval.retrieval_shards="
                   "'[\"shards/NAME/val\"]' (also eval.zeroshot_shards, eval.text_shards)")
    else:
        off += [f"{task} eval (eval.{task}_shards is empty)" for task, shards in tasks.items() if not shards]
    return off


def _at_least(low):
    return (lambda v: v is None or v >= low), f"must be >= {low}"


_POSITIVE = (lambda v: v is None or v > 0), "must be > 0"
_FRACTION = (lambda v: 0 <= v < 1), "must be in [0, 1)"
_NON_EMPTY = (lambda v: v != ""), "must not be empty"

# Value rules the types cannot express. `None` passes the numeric rules: the type check allowed it
# exactly where a field may be None.
_RULES: list[tuple[tuple[str, ...], tuple[Callable[[Any], bool], str]]] = [
    (("data.batch_size", "data.text_batch_size", "data.samples_per_epoch", "loss.tile_size",
      "loss.token_chunk_size", "train.steps", "train.accum_steps", "train.keep_checkpoints",
      "eval.batch_size", "eval.max_samples", "logging.log_every", "data.max_member_bytes"), _at_least(1)),
    (("model.lock_image_unlocked_groups", "data.shuffle_buffer", "data.num_workers", "loss.clip_weight",
      "loss.mlm_weight", "loss.ar_weight", "loss.pair_weight", "loss.text_weight_end", "optim.weight_decay",
      "schedule.warmup_steps", "train.checkpoint_every", "eval.every"), _at_least(0)),
    (("data.context_length",), _at_least(3)),  # <start>, one token, <end>
    (("optim.lr", "optim.eps", "optim.grad_clip"), _POSITIVE),
    (("model.patch_dropout", "optim.beta1", "optim.beta2", "loss.text_weight_decay_from"), _FRACTION),
    (("schedule.min_lr_ratio",), ((lambda v: 0 <= v <= 1), "must be in [0, 1]")),
    (("loss.mlm_fraction", "loss.ar_fraction"), ((lambda v: 0 < v <= 1), "must be in (0, 1] (1 = every position)")),
    (("model.name", "train.output_dir"), _NON_EMPTY),
    (("train.resume",), ((lambda v: v != ""), 'must be null, "latest" or a checkpoint path')),
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
            raise UserError(f"{source}: {name} = {_show(value)}: {_expectation(hint)}") from None
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
    if origin is Literal:  # a closed set of choices (mmpretrain.config.schema's aliases)
        if value not in args or type(value) is not type(args[0]):
            raise _Mismatch
        return value
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


def _expectation(hint: Any) -> str:
    """What a key wants: "must be one of a, b" for a choice (null first when allowed), else "expected ..."."""
    args = get_args(hint)
    optional = get_origin(hint) in (Union, UnionType) and _NONE in args
    choice = next((a for a in args if get_origin(a) is Literal), hint) if optional else hint
    if get_origin(choice) is Literal:
        return "must be one of " + ", ".join((["null"] if optional else []) + list(get_args(choice)))
    return f"expected {_describe(hint)}"


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_describe(a) for a in args if a is not _NONE) + (" or null" if _NONE in args else "")
    if origin is list:
        return f"a list of {_NAMES[args[0]][1]}"
    if origin is Literal:
        return "one of " + ", ".join(args)
    return _NAMES[hint][0]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _instantiate(cls: type, tree: Mapping[str, Any]) -> Any:
    return cls(**{k: _instantiate(h, tree[k]) if is_dataclass(h) else tree[k] for k, h in _hints(cls).items()})
