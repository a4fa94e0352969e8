"""Trainer overhead against a bare training loop, and how long training waits for real shards.

1. Overhead, in memory. One config (--config, configs/train/tiny.yaml, with --model and the
   config's batch sizes unless --batch-size / --text-batch-size: 32 image-text pairs and 32 text
   documents per step in tiny; both text heads, fp32, CPU, grad_clip as in the config). --batches
   micro-batches are built once (random images, captions tokenized by ``Tokenizer(context_length)``,
   ``text_batch(..., MaskingConfig())`` of random documents) and cycled.

   * ours: ``Trainer(cfg).train_step([batch])``: accelerate-prepared model and optimizer,
     ``accumulate_step`` (K = 1), the metric all-reduce, ``accelerator.clip_grad_norm_``, AdamW,
     the LR schedule and the temperature clamp.
   * bare: a second model built from the same config and seed, no accelerate:
     ``out = model(images, tokens, eot_index, text)``; loss = clip_loss + token_loss(mlm) +
     token_loss(ar) (mmpretrain.losses, the config's weights and chunk size); ``loss.backward()``;
     ``clip_grad_norm_``; ``build_optimizer`` (the same fused AdamW) step; ``zero_grad``; clamp.

   Both first run the same batch from the same weights and must give the same loss. Then, after
   --warmup steps each, --repeat blocks of --block steps alternate ours/bare (the order flips every
   repeat). Reported: median step time of each, ours / bare (target <= 1.05), CPU per step.

2. Data wait, real shards. Demo data (``generate_demo_data``, --images 64 px images and --documents
   documents) is prepared into image-text and text-only shards in a temp dir (or --shards /
   --text-shards are reused), then ``Trainer(cfg).fit()`` runs --steps steps for each --workers
   count (data.num_workers), with log_every=1, no eval, no trackers and one checkpoint at the end.
   From RUN/metrics.jsonl, skipping the first --skip steps (worker start-up, shuffle buffer fill):
   median and mean ``data_wait`` (fraction of the step spent in ``next(loader)``; target < 5 %),
   the share of steps above 5 %, and samples/s.

    make bench-train
    .venv/bin/python pipelines/bench/train_throughput.py [--steps 30] [--workers 2 1] [--repeat 8 --block 2]
    .venv/bin/python pipelines/bench/train_throughput.py --shards shards/demo --text-shards shards/demo-text
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmpretrain.config import load_config
from mmpretrain.data.records import ImageTextBatch
from mmpretrain.data.text.masking import MaskingConfig
from mmpretrain.data.text.objectives import text_batch
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.losses import clip_loss, token_loss
from mmpretrain.models import build_model
from mmpretrain.models.model_config import image_size
from mmpretrain.table import format_table
from mmpretrain.train.optim import build_optimizer
from mmpretrain.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TARGET_OVERHEAD, TARGET_WAIT = 1.05, 0.05
WORDS = ("a", "the", "red", "small", "bright", "old", "dog", "house", "river", "tree", "car", "street", "woman",
         "beach", "city", "runs", "sits", "near", "under", "with", "blue", "green", "photo", "of", "and")


# -- the config and the in-memory batches --------------------------------------------------------
def make_config(args, work: Path, overrides: list[str] = ()):
    sizes = [f"data.{key}={getattr(args, key)}" for key in ("batch_size", "text_batch_size") if getattr(args, key)]
    return load_config(args.config, [
        f"model.name={args.model}", *sizes, "train.precision=fp32", "eval.every=0", "logging.trackers=[]", "logging.progress=false",
        f"train.output_dir={work / 'overhead'}", *overrides])


def _sentence(g: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high + 1, (1,), generator=g))
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def make_batches(cfg, model_cfg: dict, count: int, seed: int) -> list[ImageTextBatch]:
    """`count` micro-batches as the trainer's `_to_device` hands them over: ImageTextBatch records of
    images (B, 3, S, S), tokens (B, L), eot_index (B,) and text, a TextBatch of (B_text, L) tensors."""
    g = torch.Generator().manual_seed(seed)
    tokenizer, size = Tokenizer(context_length=cfg.data.context_length), image_size(model_cfg)
    batches = []
    for _ in range(count):
        captions = [_sentence(g, 5, 15) for _ in range(cfg.data.batch_size)]
        documents = [_sentence(g, 20, 40) for _ in range(cfg.data.text_batch_size)]
        tokens = tokenizer.encode(captions)
        batches.append(ImageTextBatch(
            images=torch.randn(cfg.data.batch_size, 3, size, size, generator=g), tokens=tokens.ids,
            eot_index=tokens.eot_index, lengths=tokens.lengths, labels=torch.full((len(captions),), -1),
            captions=captions, text=text_batch(documents, tokenizer, MaskingConfig(), g)))
    return batches


# -- the bare loop -------------------------------------------------------------------------------
class Bare:
    """The same model and update, written as a plain loop: no accelerate, no metrics, no schedule."""

    def __init__(self, cfg, model_cfg: dict):
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)  # as Trainer does before building: the same initial weights
        self.cfg = cfg
        self.model = build_model(model_cfg, mlm=cfg.model.mlm, ar=cfg.model.ar)
        self.optimizer = build_optimizer(self.model, cfg.optim)  # the same AdamW (fused) as the trainer's

    def step(self, batch: ImageTextBatch) -> float:
        cfg, model = self.cfg.loss, self.model
        model.train()
        out = model(batch.images, batch.tokens, batch.eot_index, batch.text)
        clip = clip_loss(out.image_features, out.text_features, out.logit_scale,
                         local_loss=cfg.local_loss, tile_size=cfg.tile_size)["loss"]
        m, a = out.text["mlm"], out.text["ar"]
        mlm = token_loss(m.hidden, m.decoder_weight, m.labels, bias=m.bias, chunk_size=cfg.token_chunk_size)["loss"]
        ar = token_loss(a.hidden, a.decoder_weight, a.labels, chunk_size=cfg.token_chunk_size)["loss"]
        loss = cfg.clip_weight * clip + cfg.mlm_weight * mlm + cfg.ar_weight * ar
        loss.backward()
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        return loss.item()


# -- 1. overhead ---------------------------------------------------------------------------------
def bench_overhead(args, work: Path) -> dict:
    # A long schedule (no step at lr 0); the exact token losses, which the bare loop computes too.
    cfg = make_config(args, work, ["train.steps=100000", "loss.mlm_fraction=1", "loss.ar_fraction=1"])
    if not (cfg.model.mlm and cfg.model.ar) or cfg.model.sentence_pair:
        sys.exit("the bare loop runs the contrastive, MLM and AR losses: use a config with both heads and no pair head")
    trainer = Trainer(cfg)
    torch.set_num_threads(args.threads)  # on CPU the trainer sizes its threads for fit(); here both loops use --threads
    bare = Bare(cfg, trainer.model_cfg)
    batches = make_batches(cfg, trainer.model_cfg, args.batches, cfg.train.seed)
    steps = {"ours": lambda b: trainer.train_step([b])["loss"], "bare": bare.step}
    first = {name: fn(batches[0]) for name, fn in steps.items()}  # the same weights and batch: the same loss
    print(f"first-step loss: ours {first['ours']:.6f}, bare {first['bare']:.6f} "
          f"(|diff| {abs(first['ours'] - first['bare']):.1e})", flush=True)
    if abs(first["ours"] - first["bare"]) > 1e-4 * abs(first["bare"]):
        sys.exit("ours and bare do not compute the same loss: the comparison would be meaningless")
    counter = 1
    for _ in range(args.warmup - 1):
        for fn in steps.values():
            fn(batches[counter % len(batches)])
        counter += 1
    times = {name: [] for name in steps}
    cpu = {name: 0.0 for name in steps}
    for r in range(args.repeat):
        for name in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            fn, cpu_start = steps[name], time.process_time()
            for i in range(args.block):
                batch = batches[(counter + i) % len(batches)]
                start = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
        counter += args.block
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "n": len(t),
                   "cpu": cpu[name] / len(t)} for name, t in times.items()}


def print_overhead(result: dict) -> float:
    ours, bare = result["ours"], result["bare"]
    rows = [[name, r["n"], f"{r['median'] * 1e3:.1f}", f"{r['min'] * 1e3:.1f}", f"{r['max'] * 1e3:.1f}",
             f"{r['cpu'] * 1e3:.1f}", f"{r['median'] / bare['median']:.3f}", f"{r['cpu'] / bare['cpu']:.3f}"]
            for name, r in result.items()]
    print("\nstep: wall time of one optimizer step on an in-memory batch; ratio: median / bare's median; "
          "CPU: user+sys of the process (all threads) per step\n")
    print(format_table(["loop", "steps", "median ms", "min ms", "max ms", "CPU ms", "ratio", "CPU ratio"], rows))
    return ours["median"] / bare["median"]


# -- 2. data wait on real shards -----------------------------------------------------------------
def make_shards(args, work: Path) -> tuple[str, str]:
    """(image-text folder, text folder) holding train/ shards: --shards/--text-shards, or demo data."""
    if args.shards:
        return str(args.shards), str(args.text_shards)
    from mmpretrain.prepare.demo import generate_demo_data
    from mmpretrain.prepare.images import ImageOptions
    from mmpretrain.prepare.pipeline import PrepareOptions, run_prepare

    start, raw = time.perf_counter(), work / "raw"
    generate_demo_data(raw, num_images=args.images, image_size=args.image_size, num_documents=args.documents)
    image_dir, text_dir = work / "shards", work / "shards-text"
    run_prepare([str(raw / "folder"), str(raw / "manifest.csv")],
                PrepareOptions(out=str(image_dir), image=ImageOptions(image_size=args.image_size), shard_size=500,
                               val_fraction=0.05, workers=2, progress=False))
    run_prepare([str(raw / "corpus.txt")], PrepareOptions(out=str(text_dir), text_only=True, shard_size=500,
                                                          val_fraction=0.05, progress=False))
    print(f"demo data: {args.images} images at {args.image_size} px and {args.documents} documents, generated and "
          f"prepared in {time.perf_counter() - start:.1f} s", flush=True)
    return str(image_dir), str(text_dir)


def bench_data_wait(args, work: Path, shards: tuple[str, str], workers: int) -> dict:
    run = work / f"run-w{workers}"
    cfg = make_config(args, work, [
        f"data.train_shards=['{shards[0]}/train']", f"data.text_shards=['{shards[1]}/train']",
        f"data.num_workers={workers}", f"train.steps={args.steps}", "train.checkpoint_every=0",
        "logging.log_every=1", f"train.output_dir={run}"])
    start = time.perf_counter()
    Trainer(cfg).fit()
    wall = time.perf_counter() - start
    print(f"fit with {workers} worker(s): torch threads chosen by the trainer: {torch.get_num_threads()}", flush=True)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["kind"] == "train" and m["step"] > args.skip]
    wait = [m["data_wait"] for m in steps]
    rate = [m["samples_per_s"] for m in steps]
    return {"workers": workers, "steps": len(steps), "wait_median": statistics.median(wait),
            "wait_mean": statistics.fmean(wait), "over": sum(w > TARGET_WAIT for w in wait) / len(wait),
            "rate_median": statistics.median(rate), "step_ms": 1e3 * statistics.median(
                cfg.data.batch_size / r for r in rate), "wall": wall}


def print_waits(results: list[dict], in_memory_ms: float) -> None:
    rows = [[r["workers"], r["steps"], f"{100 * r['wait_median']:.2f}", f"{100 * r['wait_mean']:.2f}",
             f"{100 * r['over']:.0f}", f"{r['rate_median']:.0f}", f"{r['step_ms']:.1f}",
             f"{r['step_ms'] / in_memory_ms:.2f}",
             "PASS" if r["wait_mean"] < TARGET_WAIT else "FAIL", f"{r['wall']:.1f}"] for r in results]
    print("\nwait: data_wait from metrics.jsonl (time in next(loader) / whole step, load included) over the steps "
          "after the warm-up; >5%: share of those steps above 5%; step: median wall ms per step from samples/s; "
          "vs ours: that / ours' in-memory median (CPU shared with the loader workers shows here, not in the "
          "wait); result: mean wait vs the target; fit s: the whole fit() (loader start, final checkpoint)\n")
    print(format_table(["workers", "steps", "median wait %", "mean wait %", ">5% steps %", "samples/s",
                        "step ms", "vs ours", "result", "fit s"], rows))


# -- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/train/tiny.yaml")
    p.add_argument("--model", default="tiny", help="model.name (mmpretrain/models/model_configs)")
    p.add_argument("--batch-size", type=int, help="image-text pairs per step (default: the config's, 32 in tiny)")
    p.add_argument("--text-batch-size", type=int, help="text documents per step, MLM and AR (default: the config's)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (main process)")
    p.add_argument("--batches", type=int, default=4, help="distinct in-memory micro-batches, cycled")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop (the first one is compared)")
    p.add_argument("--repeat", type=int, default=8, help="timed blocks of each loop, alternating")
    p.add_argument("--block", type=int, default=2, help="steps per timed block")
    p.add_argument("--steps", type=int, default=30, help="fit() steps per worker count")
    p.add_argument("--skip", type=int, default=5, help="first fit() steps left out of the data-wait figures")
    p.add_argument("--workers", type=int, nargs="*", default=[2, 1], help="data.num_workers for fit(); none: skip part 2")
    p.add_argument("--images", type=int, default=1500, help="demo images to prepare")
    p.add_argument("--documents", type=int, default=600, help="demo text documents to prepare")
    p.add_argument("--image-size", type=int, default=64, help="demo image size (px)")
    p.add_argument("--shards", type=Path, help="reuse a prepare output folder (with train/) instead of demo data")
    p.add_argument("--text-shards", type=Path, help="with --shards: the text-only prepare output folder")
    args = p.parse_args(argv)
    if bool(args.shards) != bool(args.text_shards):
        p.error("--shards and --text-shards go together")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        return _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> int:
    cfg = make_config(args, work)
    print(f"cores available: {len(os.sched_getaffinity(0))}; torch threads: {torch.get_num_threads()} (interop "
          f"{torch.get_num_interop_threads()}); {args.config.name}, model {cfg.model.name}, {cfg.data.batch_size} "
          f"image-text pairs + {cfg.data.text_batch_size} text docs per step (context {cfg.data.context_length}), "
          f"MLM + AR, fp32 CPU, grad_clip {cfg.optim.grad_clip}; {args.repeat} x {args.block} steps per loop after "
          f"{args.warmup} warm-up; fit: {args.steps} steps, workers {args.workers}, first {args.skip} left out; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    overhead = bench_overhead(args, work)
    ratio = print_overhead(overhead)
    waits = []
    if args.workers:
        shards = make_shards(args, work)
        for w in args.workers:
            waits.append(bench_data_wait(args, work, shards, w))
            print(f"fit with {w} worker(s): {waits[-1]['wall']:.1f} s", flush=True)
        print_waits(waits, 1e3 * overhead["ours"]["median"])
    ok = ratio <= TARGET_OVERHEAD and all(r["wait_mean"] < TARGET_WAIT for r in waits)
    print(f"\nsummary (load average after: {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s)")
    print(f"  overhead   ours / bare median step: {ratio:.3f}   target <= {TARGET_OVERHEAD}   "
          f"{'PASS' if ratio <= TARGET_OVERHEAD else 'FAIL'}")
    for r in waits:
        print(f"  data wait  {r['workers']} worker(s): mean {100 * r['wait_mean']:.2f} %, median "
              f"{100 * r['wait_median']:.2f} %   target < {100 * TARGET_WAIT:.0f} %   "
              f"{'PASS' if r['wait_mean'] < TARGET_WAIT else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
