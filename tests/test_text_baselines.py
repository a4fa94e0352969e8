"""pipelines/text_baselines.py on a corpus whose answers are known: every document is "a cat", so the
next token after <start>, "a" and "cat" is certain (bigram perplexity ~1) while a unigram model spreads
over the three targets a, cat, <end> (perplexity ~3)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mmpretrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("text_baselines", ROOT / "pipelines" / "text_baselines.py")
tb = importlib.util.module_from_spec(_spec)
sys.modules["text_baselines"] = tb
_spec.loader.exec_module(tb)


def _shards(tmp: Path, name: str, lines: list[str]) -> str:
    corpus = tmp / f"{name}.txt"
    corpus.write_text("".join(line + "\n" for line in lines))
    out = tmp / name
    assert main(["prepare", str(corpus), "--text-only", "--out", str(out), "--val-fraction", "0",
                 "--no-progress"]) == 0
    return str(out / "train")


def test_known_corpus_gives_the_known_perplexities(tmp_path, capsys):
    train = _shards(tmp_path, "train", ["a cat"] * 60)
    val = _shards(tmp_path, "val", ["a cat"] * 10)
    capsys.readouterr()
    r = tb.baselines(train, val, context_length=16, seed=0)
    assert r["train_ar_tokens"] == 60 * 3 and r["ar_tokens"] == 10 * 3  # a, cat, <end> per document
    # Unigram: a third each, less the Witten-Bell share left for unseen tokens (3 types in 180).
    assert r["ar_perplexity_unigram"] == pytest.approx(3 * (183 / 180), rel=1e-3)
    # Bigram: every context was followed by one type, 60 times: lambda = 60/61 on a certain successor.
    assert 1.0 < r["ar_perplexity_bigram"] < 1.03
    assert 0 <= r["mlm_accuracy_unigram"] <= r["mlm_accuracy_bigram"] <= 1 and r["mlm_tokens"] > 0
    out = tmp_path / "b.json"
    assert tb.main([train, val, "--context-length", "16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ar_tokens"] == 30
    assert "bigram" in capsys.readouterr().out
