"""`--help` of every verb shows each option's default (and never "default: None"); `train --help`
lists every config key with its type, default and docstring, without importing torch."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from mmpretrain.cli import build_parser
from mmpretrain.config import schema
from mmpretrain.config.docs import key_docs


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser a user can ask for help: each verb and each `eval TASK`."""
    out = {}

    def walk(parser, name):
        out[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())

    walk(build_parser(), "")
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(n for n in _parsers() if n))
def test_every_option_with_a_default_shows_it(name):
    parser = _parsers()[name]
    text = _flat(parser.format_help())
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert f"default: {action.default}" in text or f"default: {action.default!r}" in text, (name, action.dest)
    assert "default: None" not in text and "default: False" not in text


def test_known_defaults_are_in_the_help():
    parsers = _parsers()
    assert "--image-size IMAGE_SIZE default: 256" in _flat(parsers["prepare"].format_help())
    assert "--precision {fp32,bf16,fp16} default: fp32" in _flat(parsers["eval zeroshot"].format_help())
    assert "--positives {sample,image,caption}" in _flat(parsers["eval retrieval"].format_help())


def test_train_help_lists_every_config_key_with_its_docstring():
    docs = key_docs()
    text = _flat(_parsers()["train"].format_help())

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    assert [d.key for d in docs] == list(leaves(schema.Config))
    missing = [d.key for d in docs if not d.doc]
    assert missing == [], f"config fields without a docstring in mmpretrain/config/schema.py: {missing}"
    for d in docs:
        assert f"{d.key} (" in text and _flat(d.doc) in text, d.key
    assert "data.mode (resampled|epoch, default resampled)" in text  # Literal choices spelled out
    assert "eval.retrieval_positives (sample|image|caption, default sample)" in text
    assert "train.resume (str | None, default null)" in text


def test_train_help_imports_no_torch():
    code = ("import sys\nfrom mmpretrain.cli import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "data.train_shards" in out.stdout
