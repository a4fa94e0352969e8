"""The training config: YAML merge, dotted overrides, type and value errors as one-line UserErrors."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mmpretrain.config import (
    Config,
    MaskingConfig,
    config_to_dict,
    load_config,
    require_training_data,
    save_config,
    sections_off,
    validate_config,
)
from mmpretrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "train").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(*args) -> str:
    with pytest.raises(UserError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.train.steps == 1000 and cfg.optim.grad_clip == 1.0 and cfg.data.train_shards == []
    assert cfg.data.masking == MaskingConfig()
    assert list(config_to_dict(cfg)) == ["model", "data", "loss", "optim", "schedule", "train", "eval", "logging"]


def test_yaml_merges_onto_defaults(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\ndata:\n  masking:\n    strategy: span\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path)
    assert cfg.train.steps == 7
    assert cfg.train.accum_steps == 1  # untouched keys of a touched section keep their defaults
    assert cfg.data.masking.strategy == "span" and cfg.data.masking.probability == 0.15
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 would read "1e-3" as a string
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()


def test_overrides_of_each_kind(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=10", "optim.weight_decay=1", "model.mlm=false",
                             "model.sentence_pair=sop", "optim.grad_clip=null", "data.train_shards=[a.tar,b.tar]",
                             "data.train_weights=[1, 2.5]", "data.masking.probability=0.3",
                             "data.augmentation.scale=[0.9, 1.0]", "train.resume=latest"])
    assert cfg.train.steps == 10  # the command line wins over the file
    assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.mlm is False and cfg.model.sentence_pair == "sop"
    assert cfg.optim.grad_clip is None
    assert cfg.data.train_shards == ["a.tar", "b.tar"]
    assert cfg.data.train_weights == [1.0, 2.5] and all(isinstance(w, float) for w in cfg.data.train_weights)
    assert cfg.data.masking.probability == 0.3
    assert cfg.data.augmentation == {"scale": [0.9, 1.0]}
    assert cfg.train.resume == "latest"
    nsp = load_config(None, ["model.sentence_pair=nsp"])
    assert nsp.model.sentence_pair == "nsp"
    assert load_config(None, ["model.sentence_pair=null"]).model.sentence_pair is None
    # one pattern needs no list brackets (brace ranges would not parse inside a YAML flow list)
    assert load_config(None, ["data.train_shards=/d/{000..009}.tar"]).data.train_shards == ["/d/{000..009}.tar"]


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=1", "unknown key 'train.stpes'; did you mean 'train.steps'?"),
    ("data.batchsize=8", "did you mean 'data.batch_size'?"),
    ("data.masking.probabilty=0.2", "did you mean 'data.masking.probability'?"),
    ("train.lr=0.1", "did you mean 'optim.lr'?"),  # right key, wrong section
    ("trian.steps=1", "unknown section 'trian'; did you mean 'train'?"),
    ("train.zzz=1", "valid keys: steps, accum_steps"),
])
def test_unknown_keys_name_the_dotted_key_and_suggest(override, expected):
    message = error(None, [override])
    assert message.startswith("command line: ")
    assert expected in message


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    assert error(path) == f"{path}: unknown key 'optim.learning_rate'; valid keys: lr, weight_decay, beta1, " \
                          "beta2, eps, grad_clip, fused"


@pytest.mark.parametrize("override, expected", [
    ("train.steps=abc", "train.steps = 'abc': expected an integer"),
    ("train.steps=2.5", "train.steps = 2.5: expected an integer"),
    ("train.steps=true", "train.steps = True: expected an integer"),
    ("model.mlm=1", "model.mlm = 1: expected true or false"),
    ("model.mlm=yes please", "model.mlm = 'yes please': expected true or false"),
    ("data.train_shards=5", "data.train_shards = 5: expected a list of strings"),
    ("data.train_shards=[a, 3]", "data.train_shards = ['a', 3]: expected a list of strings"),
    ("data.train_weights=[a]", "data.train_weights = ['a']: expected a list of numbers or null"),
    ("optim.grad_clip=none", "optim.grad_clip = 'none': expected a number or null"),  # YAML's null is null
    ("optim.grad_clip=off", "optim.grad_clip = False: expected a number or null"),  # YAML 1.1: off is false
    ("optim.lr=null", "optim.lr = None: expected a number"),
    ("model.name=3", "model.name = 3: expected a string"),
    ("data.augmentation=[1]", "data.augmentation = [1]: expected a mapping"),
    ("data.masking=3", "data.masking must be a mapping of keys, got 3"),
])
def test_wrong_types(override, expected):
    assert error(None, [override]) == f"command line: {expected}"


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: lots\n")
    assert error(path) == f"{path}: train.steps = 'lots': expected an integer"
    path = write(tmp_path, "- train\n", "list.yaml")
    assert error(path) == f"{path}: the file's top level must be a mapping of keys, got ['train']"
    path = write(tmp_path, "train: 5\n", "section.yaml")
    assert error(path) == f"{path}: train must be a mapping of keys, got 5"


@pytest.mark.parametrize("item, expected", [
    ("train.steps", "'train.steps' is not an override; write section.key=value"),
    ("steps=3", "'steps=3': the key must be section.key"),
    ("=3", "'=3': the key must be section.key"),
    ("train.=3", "'train.=3': the key must be section.key"),
    ("data.train_shards=[a/{0..3}.tar]", "data.train_shards=[a/{0..3}.tar]: the value is not valid YAML"),
])
def test_override_syntax_errors(item, expected):
    message = error(None, [item])
    assert message.startswith(f"command line: {expected}")


@pytest.mark.parametrize("overrides, expected", [
    (["data.batch_size=0"], "data.batch_size = 0: must be >= 1"),
    (["data.text_batch_size=0"], "data.text_batch_size = 0: must be >= 1"),
    (["data.max_member_bytes=0"], "data.max_member_bytes = 0: must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers = -1: must be >= 0"),
    (["data.context_length=2"], "data.context_length = 2: must be >= 3"),
    (["data.mode=stream"], "data.mode = 'stream': must be one of resampled, epoch"),
    (["data.train_shards=[a, b]", "data.train_weights=[1.0]"],
     "data.train_weights = [1.0]: needs one weight per data.train_shards pattern (2)"),
    (["data.train_shards=[a]", "data.train_weights=[0]"], "data.train_weights = [0.0]: weights must be > 0"),
    (["data.train_shards=[a]", "data.train_weights=[1]", "data.mode=epoch"],
     "data.train_weights = [1.0]: weights only apply to data.mode = resampled"),
    (["loss.contrastive=infonce"], "loss.contrastive = 'infonce': must be one of clip, siglip"),
    (["loss.tile_size=0"], "loss.tile_size = 0: must be >= 1"),
    (["loss.mlm_weight=-0.5"], "loss.mlm_weight = -0.5: must be >= 0"),
    (["loss.ar_fraction=0"], "loss.ar_fraction = 0.0: must be in (0, 1] (1 = every position)"),
    (["loss.mlm_fraction=1.5"], "loss.mlm_fraction = 1.5: must be in (0, 1] (1 = every position)"),
    (["loss.text_weight_end=-0.5"], "loss.text_weight_end = -0.5: must be >= 0"),
    (["loss.text_weight_decay_from=1"], "loss.text_weight_decay_from = 1.0: must be in [0, 1)"),
    (["loss.contrastive=siglip", "loss.local_loss=true"], "loss.local_loss = True: only loss.contrastive = clip"),
    (["model.sentence_pair=mlm"], "model.sentence_pair = 'mlm': must be one of null, nsp, sop"),
    (["model.patch_dropout=1.0"], "model.patch_dropout = 1.0: must be in [0, 1)"),
    (["optim.lr=0"], "optim.lr = 0.0: must be > 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay = -1.0: must be >= 0"),
    (["optim.beta2=1"], "optim.beta2 = 1.0: must be in [0, 1)"),
    (["optim.eps=0"], "optim.eps = 0.0: must be > 0"),
    (["optim.grad_clip=0"], "optim.grad_clip = 0.0: must be > 0"),
    (["schedule.name=linear"], "schedule.name = 'linear': must be one of cosine, constant"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps = -1: must be >= 0"),
    (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio = 1.5: must be in [0, 1]"),
    (["train.steps=0"], "train.steps = 0: must be >= 1"),
    (["train.accum_steps=0"], "train.accum_steps = 0: must be >= 1"),
    (["train.precision=fp8"], "train.precision = 'fp8': must be one of fp32, bf16, fp16"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every = -1: must be >= 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints = 0: must be >= 1"),
    (["train.resume=''"], "train.resume = '': must be null, \"latest\" or a checkpoint path"),
    (["eval.every=-1"], "eval.every = -1: must be >= 0"),
    (["eval.batch_size=0"], "eval.batch_size = 0: must be >= 1"),
    (["logging.log_every=0"], "logging.log_every = 0: must be >= 1"),
    (["logging.trackers=[tensorboard, 1]"], "logging.trackers = ['tensorboard', 1]: expected a list of strings"),
])
def test_value_errors(overrides, expected):
    assert error(None, overrides).startswith(f"command line: {expected}")


def test_value_error_names_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  beta1: 1.5\n")
    assert error(path) == f"{path}: optim.beta1 = 1.5: must be in [0, 1)"


def test_accepted_edge_values():
    assert load_config(None, ["loss.tile_size=null"]).loss.tile_size is None
    cfg = load_config(None, ["loss.tile_size=1", "data.num_workers=0", "optim.beta1=0",
                             "schedule.min_lr_ratio=1", "train.checkpoint_every=0", "train.resume=runs/x/ckpt-100",
                             "loss.contrastive=siglip", "schedule.name=constant", "train.precision=bf16"])
    assert (cfg.loss.tile_size, cfg.data.num_workers, cfg.train.resume) == (1, 0, "runs/x/ckpt-100")


def test_masking_errors_are_user_errors_with_the_dotted_key(tmp_path):
    assert error(None, ["data.masking.probability=1.5"]) == \
        "command line: data.masking.probability = 1.5: must be in (0, 1)"
    path = write(tmp_path, "data:\n  masking:\n    strategy: sentence\n")
    assert error(path).startswith(f"{path}: data.masking.strategy = 'sentence': must be one of token")
    with pytest.raises(ValueError, match=r"^masking\.probability = 0\.0: must be in \(0, 1\)$"):
        MaskingConfig(probability=0.0)  # the section is immutable and checked when built, also in code


def test_masking_config_is_the_section():
    cfg = load_config(None, ["data.masking.strategy=span", "data.masking.max_span=5"])
    assert cfg.data.masking == MaskingConfig(strategy="span", max_span=5)


def test_missing_file_and_bad_yaml_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(missing).startswith(f"config file {missing}: no such file")
    path = write(tmp_path, "train:\n  steps: [1, 2\n")
    message = error(path)
    assert message.startswith(f"config file {path}: not valid YAML (") and "line 3" in message
    path = write(tmp_path, "train:\n\tsteps: 1\n", "tabs.yaml")
    assert error(path).startswith(f"config file {path}: not valid YAML")


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "train" / "tiny.yaml", ["optim.eps=1e-8", "data.train_weights=[3]", "data.augmentation.scale=[0.5, 1]",
                                   "loss.tile_size=null", "model.sentence_pair=nsp", "train.resume=latest"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["model", "data", "loss", "optim", "schedule", "train", "eval", "logging"]
    assert list(saved["train"])[:3] == ["steps", "accum_steps", "precision"]  # field order, not sorted
    save_config(replace(cfg, train=replace(cfg.train, steps=5)), path)  # overwrite in place
    assert load_config(path).train.steps == 5


def test_validate_config_on_a_config_built_in_code():
    cfg = Config()
    cfg.train.steps = 0
    with pytest.raises(UserError, match=r"^train.steps = 0: must be >= 1$"):
        validate_config(cfg)


def test_training_needs_train_shards():
    with pytest.raises(UserError, match=r"^data.train_shards is empty: ") as e:
        require_training_data(load_config(None))
    require_training_data(load_config(None, ["data.train_shards=[shards/demo/train]"]))
    # the message's examples are overrides a user can paste (shell quotes removed) and they load as written
    examples = [m.replace("'", "") for m in re.findall(r"(data\.train_shards=\S+?),?(?:\s|$)", str(e.value))]
    assert [load_config(None, [ex]).data.train_shards for ex in examples] == [
        ["shards/NAME/train"], ["shards/NAME/train/NAME-{000000..000009}.tar"]]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    if recipe.name == "my-data.yaml":  # the user recipe: its one required key is left for the user
        with pytest.raises(UserError, match=r"^data.train_shards is empty: .*data.train_shards="):
            require_training_data(cfg)
        cfg = load_config(recipe, ["data.train_shards=[shards/mine/train]"])
    require_training_data(cfg)
    assert cfg.data.context_length <= 77


def test_the_user_recipe_needs_only_train_shards_and_says_what_is_off():
    cfg = load_config(ROOT / "configs" / "train" / "my-data.yaml", ["data.train_shards=[shards/mine/train]"])
    assert (cfg.model.name, cfg.eval.every, cfg.data.text_shards) == ("ViT-B-32", 0, [])
    off = sections_off(cfg)
    assert [o.split(" (")[0] for o in off] == ["text corpus", "periodic eval"]
    assert "data.text_shards=" in off[0] and "eval.every=N" in off[1]
    on = load_config(ROOT / "configs" / "train" / "tiny.yaml")
    assert sections_off(on) == []
    partly = load_config(ROOT / "configs" / "train" / "tiny.yaml", ["eval.zeroshot_shards=[]", "model.mlm=false",
                                                                    "model.ar=false"])
    assert sections_off(partly) == ["text branch (model.mlm=false, model.ar=false): set model.mlm=true / "
                                    "model.ar=true", "zeroshot eval (eval.zeroshot_shards is empty)"]


def test_recipes_say_what_they_promise():
    by_name = {p.stem: load_config(p) for p in RECIPES}
    assert {"tiny", "vit-b-32", "vit-b-32-contrastive", "vit-b-16"} <= set(by_name)
    tiny = by_name["tiny"]
    assert tiny.data.train_shards == ["shards/demo/train"] and tiny.data.context_length == 32
    assert tiny.train.precision == "fp32" and tiny.eval.retrieval_shards == ["shards/demo/val"]
    b32, clip = by_name["vit-b-32"], by_name["vit-b-32-contrastive"]
    assert b32.model.mlm and b32.model.ar and not clip.model.mlm and not clip.model.ar
    assert b32.data.batch_size * 8 == 4096 and b32.train.precision == "bf16" and b32.loss.tile_size == 1024
    # the contrastive recipe is the same experiment without the text branch
    strip = {"model": {"mlm": False, "ar": False}, "train": {"output_dir": ""}, "data": {"text_batch_size": 0}}
    a, b = config_to_dict(b32), config_to_dict(clip)
    for section, keys in strip.items():
        for key in keys:
            a[section].pop(key), b[section].pop(key)
    assert a == b
    assert by_name["vit-b-16"].model.grad_checkpointing and by_name["vit-b-16"].data.batch_size == 256


def test_a_key_given_twice_is_an_error_naming_the_shell_expansion():
    # what bash makes of an unquoted data.train_shards=/d/{000..002}.tar
    overrides = [f"data.train_shards=/d/{i:03d}.tar" for i in range(3)]
    with pytest.raises(UserError, match=r"data.train_shards is given 3 times.*must be quoted"):
        load_config(None, overrides)
    # a scalar key repeated: the last one wins (scripts append overrides to a base list)
    assert load_config(None, ["train.steps=3", "train.steps=5"]).train.steps == 5


def test_every_field_annotation_has_a_type_check():
    """_coerce raises NotImplementedError for an annotation it cannot check (a developer adding a field
    of a new type); every field of every section must use the types it handles."""
    from dataclasses import fields, is_dataclass
    from typing import Literal, get_args, get_origin, get_type_hints

    from mmpretrain.config.load import _coerce, _Mismatch

    samples = {bool: True, int: 3, float: 0.5, str: "x", dict: {}, type(None): None}

    def leaves(hint):
        if get_origin(hint) is Literal:  # a choice: every value passes as itself, anything else fails
            for value in get_args(hint):
                assert _coerce(value, hint) == value
            with pytest.raises(_Mismatch):
                _coerce("not-a-choice", hint)
            return []
        args = get_args(hint)
        return [leaf for arg in args for leaf in leaves(arg)] if args else [hint]

    def walk(cls, prefix=""):
        hints = get_type_hints(cls)
        for f in fields(cls):
            hint = hints[f.name]
            if is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            for leaf in leaves(hint):
                assert leaf in samples, f"{prefix}{f.name}: {leaf!r} has no type check"
            assert _coerce(getattr(cls(), f.name), hint) == getattr(cls(), f.name), f"{prefix}{f.name}"

    walk(Config)
