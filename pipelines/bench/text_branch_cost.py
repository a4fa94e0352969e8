"""What the text branch costs the trainer: samples/s with the MLM + AR heads on against the heads off.

For each --models entry (tiny: 64 px ViT and text tower 64 wide × 2 layers, 2.3 M parameters mostly the
49,410-token embedding; small: the 19 M model, ViT 64 px patch 8 and text tower 256 wide × 4 layers),
one Trainer per variant is built from the same config and seed (configs/train/tiny.yaml, 32 image-text
pairs and 32 text documents per step unless --batch-size / --text-batch-size) and
``Trainer.train_step`` runs on in-memory batches (pipelines/bench/train_throughput.py's, cycled):

* off: ``model.mlm=false model.ar=false`` (InfoNCE only: the reference);
* exact: both heads, every predicted position decoded over the whole vocabulary (the default);
* captions: both heads learning from the step's captions instead of text documents (no text shards),
  so the AR head reuses the contrastive branch's causal pass (one trunk pass fewer);
* sampled: both heads with the named estimator ``loss.mlm_fraction`` / ``loss.ar_fraction``
  (--mlm-fraction, --ar-fraction): a uniform random subset of the predicted positions is decoded and
  weighted to an unbiased estimate of the exact loss (mmpretrain/losses/text.py);
* captions+sampled: both.

After --warmup steps of each, --repeat blocks of --block steps run round robin (the order rotates every
repeat). Reported per model: median step time, image-text samples/s, and samples/s / off's (targets:
>= 0.5 on tiny and >= 0.8 on small), and where a text-on step's time goes: the vocabulary decoders
(MLM + AR token losses, forward and backward, timed alone on the step's predictions) and the rest.

    .venv/bin/python pipelines/bench/text_branch_cost.py [--models tiny small] [--repeat 6 --block 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ROOT, make_batches, make_config  # noqa: E402

from mmpretrain.data.text.masking import MaskingConfig  # noqa: E402
from mmpretrain.data.text.objectives import text_batch  # noqa: E402
from mmpretrain.data.text.tokenizer import Tokenizer  # noqa: E402
from mmpretrain.losses.objective import vocabulary_losses  # noqa: E402
from mmpretrain.table import format_table  # noqa: E402
from mmpretrain.train.trainer import Trainer  # noqa: E402

TARGETS = {"tiny": 0.5, "small": 0.8}
OFF = ["model.mlm=false", "model.ar=false"]


def variants(args) -> dict[str, tuple[list[str], bool]]:
    """name -> (config overrides, text branch from the captions)."""
    sampled = [f"loss.mlm_fraction={args.mlm_fraction}", f"loss.ar_fraction={args.ar_fraction}"]
    return {"off": (OFF, False), "exact": ([], False), "captions": ([], True), "sampled": (sampled, False),
            "captions+sampled": (sampled, True)}


def with_caption_text(batches, cfg, seed: int):
    """The same batches with the text branch made from their captions, as the loader does without text shards."""
    tokenizer, g = Tokenizer(context_length=cfg.data.context_length), torch.Generator().manual_seed(seed)
    return [dataclasses.replace(b, text=text_batch(b.captions, tokenizer, MaskingConfig(), g)) for b in batches]


def decoder_ms(trainer: Trainer, batch, repeat: int = 3) -> float:
    """Median ms of the MLM + AR token losses alone (forward and backward) on one step's predictions,
    decoded as the step decodes them: together, in one call (objective.vocabulary_losses)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    loss_cfg = trainer.cfg.loss
    with torch.no_grad():
        preds = model.text_predictions(batch.text)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        detached = {name: dataclasses.replace(pred, hidden=pred.hidden.detach().requires_grad_())
                    for name, pred in preds.items()}
        loss, _ = vocabulary_losses(detached, loss_cfg, {})
        loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def bench_model(args, model: str, work: Path) -> list[list]:
    args.model = model
    trainers, inputs = {}, {}
    for name, (overrides, from_captions) in variants(args).items():
        cfg = make_config(args, work / model / name, ["train.steps=100000", *overrides])
        trainers[name] = Trainer(cfg)
        batches = make_batches(cfg, trainers[name].model_cfg, args.batches, cfg.train.seed)
        inputs[name] = with_caption_text(batches, cfg, cfg.train.seed) if from_captions else batches
    torch.set_num_threads(args.threads)
    names = list(trainers)
    for name in names:
        for i in range(args.warmup):
            trainers[name].train_step([inputs[name][i % args.batches]])
    times = {name: [] for name in names}
    for r in range(args.repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i in range(args.block):
                batch = inputs[name][(r * args.block + i) % args.batches]
                start = time.perf_counter()
                trainers[name].train_step([batch])
                times[name].append(time.perf_counter() - start)
    off = statistics.median(times["off"])
    size = trainers["off"].cfg.data.batch_size
    rows = []
    for name in names:
        step = statistics.median(times[name])
        decode = decoder_ms(trainers[name], inputs[name][0]) if name != "off" else 0.0
        ratio = off / step
        target = TARGETS.get(model)
        verdict = "" if name == "off" or target is None else ("PASS" if ratio >= target else "FAIL")
        rows.append([model, name, len(times[name]), f"{1e3 * step:.1f}", f"{size / step:.0f}", f"{ratio:.2f}",
                     verdict, f"{decode:.1f}" if name != "off" else "-",
                     f"{1e3 * step - decode - 1e3 * off:.1f}" if name != "off" else "-"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/train/tiny.yaml")
    p.add_argument("--models", nargs="+", default=["tiny", "small"], help="model.name values")
    p.add_argument("--batch-size", type=int, help="image-text pairs per step (default: the config's, 32)")
    p.add_argument("--text-batch-size", type=int, help="text documents per step (default: the config's, 32)")
    p.add_argument("--mlm-fraction", type=float, default=0.25, help="loss.mlm_fraction of the sampled variants")
    p.add_argument("--ar-fraction", type=float, default=0.05, help="loss.ar_fraction of the sampled variants")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--batches", type=int, default=4, help="distinct in-memory micro-batches, cycled")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant")
    p.add_argument("--repeat", type=int, default=6, help="timed blocks of each variant, round robin")
    p.add_argument("--block", type=int, default=2, help="steps per timed block")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmpretrain-text-cost-") as tmp:
        for model in args.models:
            rows += bench_model(args, model, Path(tmp))
    print(f"\ntext-on vs text-off, {args.threads} threads, fp32, in-memory batches; sampled = loss.mlm_fraction="
          f"{args.mlm_fraction} loss.ar_fraction={args.ar_fraction}; vs off: off's step time / this one's "
          f"(samples/s ratio; targets tiny >= {TARGETS['tiny']}, small >= {TARGETS['small']}); decoders: the MLM + AR "
          "token losses alone, forward + backward; rest: step - decoders - off's step (the extra trunk passes, "
          "heads, their share of the update)\n")
    print(format_table(["model", "variant", "steps", "median ms", "samples/s", "vs off", "target", "decoders ms",
                        "rest ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
