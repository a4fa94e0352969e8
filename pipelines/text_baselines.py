"""Count-based baselines for the text metrics: what unigram and bigram models reach on held-out text.

    .venv/bin/python pipelines/text_baselines.py shards/demo-text/train shards/demo-text/val [--context-length 32]

Both splits are read exactly as `mmpretrain eval text` reads its shards (the same tokenizer and
context length, the same next-token targets, the same seeded masks per document), so the numbers sit
next to the model's `ar_perplexity` and `mlm_accuracy`:

* AR perplexity of the next token, fitted on the train split's targets: a unigram model (interpolated
  with the uniform distribution over the 49,410-token vocabulary, Witten–Bell's weight, so a token
  never seen in training keeps a small probability) and an interpolated bigram model
  P(w | v) = λ(v) · count(v, w) / count(v) + (1 − λ(v)) · P_unigram(w), Witten–Bell's λ(v) =
  count(v) / (count(v) + types after v), so a context seen often trusts its own counts;
* MLM accuracy on the masked tokens: always the most frequent token (unigram), and the most frequent
  token after the input token to the left (bigram; the left token as the model sees it, so a masked
  neighbour gives no hint).

Prints one table; --json writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mmpretrain.config import MaskingConfig
from mmpretrain.data.loader import TextBranch, text_loader
from mmpretrain.data.records import IGNORE_INDEX
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.shards.resolve import ShardSource
from mmpretrain.table import format_table


def read_batches(shards: str, context_length: int, seed: int):
    """The text batches `mmpretrain eval text` scores (masks seeded per document by `seed`)."""
    stream = StreamConfig(shards=(ShardSource(shards),), batch_size=256, mode="epoch", shuffle=False, drop_last=False)
    tokenizer = Tokenizer(context_length=context_length)
    yield from text_loader(stream, tokenizer=tokenizer, text_branch=TextBranch(MaskingConfig()), rank=0, world=1,
                           num_workers=0, sample_seed=seed)


def pairs(batch, inputs: str, labels: str):
    """(previous input token, target) for every predicted position of a batch."""
    ids, targets = getattr(batch, inputs), getattr(batch, labels)
    for row_ids, row_targets in zip(ids.tolist(), targets.tolist()):
        for i, target in enumerate(row_targets):
            if target != IGNORE_INDEX:
                # AR: the input at i is the token before the target; MLM: the input left of the masked position.
                yield (row_ids[i] if inputs == "ar_input_ids" else (row_ids[i - 1] if i else None)), target


class Counts:
    def __init__(self, vocab: int):
        self.vocab, self.unigram, self.bigram = vocab, Counter(), defaultdict(Counter)
        self._total: int | None = None

    def add(self, previous, target) -> None:
        self._total = None
        self.unigram[target] += 1
        self.bigram[previous][target] += 1

    def p_unigram(self, w: int) -> float:
        n, types = self.total, len(self.unigram)
        lam = n / (n + types)  # Witten-Bell against the uniform distribution: unseen tokens keep a little mass
        return lam * self.unigram[w] / n + (1 - lam) / self.vocab

    @property
    def total(self) -> int:
        if self._total is None:
            self._total = sum(self.unigram.values())
        return self._total

    def p_bigram(self, v, w: int) -> float:
        after = self.bigram.get(v)
        if not after:
            return self.p_unigram(w)
        n, types = sum(after.values()), len(after)
        lam = n / (n + types)
        return lam * after[w] / n + (1 - lam) * self.p_unigram(w)

    def guess(self, v) -> int:
        after = self.bigram.get(v)
        return (after or self.unigram).most_common(1)[0][0]


def baselines(train: str, val: str, context_length: int, seed: int) -> dict:
    vocab = Tokenizer(context_length=context_length).vocab_size
    ar, mlm = Counts(vocab), Counts(vocab)
    for batch in read_batches(train, context_length, seed):
        for v, w in pairs(batch, "ar_input_ids", "ar_labels"):
            ar.add(v, w)
        for v, w in pairs(batch, "mlm_input_ids", "mlm_labels"):
            mlm.add(v, w)
    nll_uni = nll_bi = 0.0
    ar_tokens = mlm_tokens = right_uni = right_bi = 0
    top = mlm.unigram.most_common(1)[0][0]
    for batch in read_batches(val, context_length, seed):
        for v, w in pairs(batch, "ar_input_ids", "ar_labels"):
            nll_uni -= math.log(ar.p_unigram(w))
            nll_bi -= math.log(ar.p_bigram(v, w))
            ar_tokens += 1
        for v, w in pairs(batch, "mlm_input_ids", "mlm_labels"):
            right_uni += w == top
            right_bi += w == mlm.guess(v)
            mlm_tokens += 1
    if not ar_tokens or not mlm_tokens:
        sys.exit(f"text_baselines: {val} has no text to score")
    return {"ar_perplexity_unigram": math.exp(nll_uni / ar_tokens), "ar_perplexity_bigram": math.exp(nll_bi / ar_tokens),
            "mlm_accuracy_unigram": right_uni / mlm_tokens, "mlm_accuracy_bigram": right_bi / mlm_tokens,
            "ar_tokens": ar_tokens, "mlm_tokens": mlm_tokens, "train_ar_tokens": sum(ar.unigram.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train", help="text shards to count on (a folder, pattern or URL)")
    p.add_argument("val", help="held-out text shards to score")
    p.add_argument("--context-length", type=int, default=32, help="tokens per text, as the model's (32 for tiny)")
    p.add_argument("--seed", type=int, default=0, help="mask seed, as `mmpretrain eval text --seed` (0)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    r = baselines(args.train, args.val, args.context_length, args.seed)
    print(format_table(["model", "AR perplexity", "MLM accuracy"], [
        ["unigram", f"{r['ar_perplexity_unigram']:.1f}", f"{100 * r['mlm_accuracy_unigram']:.1f} %"],
        ["bigram", f"{r['ar_perplexity_bigram']:.2f}", f"{100 * r['mlm_accuracy_bigram']:.1f} %"]]))
    print(f"scored {r['ar_tokens']} next tokens and {r['mlm_tokens']} masked tokens; counted "
          f"{r['train_ar_tokens']} training targets")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
