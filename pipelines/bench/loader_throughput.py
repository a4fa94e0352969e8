"""Throughput of our image-text loader against a bare webdataset pipeline on the same shards.

Compared, for each worker count W (default 1 and 2; 0 = in the main process), on one epoch:

* ours: ``image_text_loader(StreamConfig(shards, batch_size=B, shuffle_buffer=K), tokenizer=Tokenizer(),
  transform=image_transforms(S, train=True), num_workers=W)`` (drop_last).
* ours+text: the same with ``text_branch=TextBranch()`` (MLM + AR batches from the captions), at the
  first --workers value only: it shows what masking costs and is not judged.
* bare: ``wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False).shuffle(K,
  initial=K).decode("pil").to_tuple("jpg;png;webp", "txt").map_tuple(transform, str.strip).batched(B,
  partial=False)`` in ``wds.WebLoader(batch_size=None, num_workers=W)``; a batch is the stacked images
  plus the *same* ``Tokenizer.encode`` (ours, = open_clip's ids) of its captions.

Timed: one epoch from ``iter()`` (worker start, tar reading, shuffle, decode, transform, tokenization,
collation, transfer), after a warm-up; torch runs 1 thread in the main process as in workers. Jobs
run interleaved, best of --repeat. Target (issue): ours >= 0.9 x bare.

Resume cost (W=1): a loader restored from the state taken half-way through the timed W=1 epoch starts
at that place of the global sample order (nothing is replayed); iter() -> first batch restored minus
fresh, per 10k samples skipped, next to decoding 10k at the bare rate. The restored batch is checked.

Shards: --num photo-like JPEGs (q95, --image-size px) with .txt and .json members as `prepare` writes
them, --shard-size per tar, and sizes.json; kept in --work and reused.

    .venv/bin/python pipelines/bench/loader_throughput.py [--num 10000] [--image-size 224] [--workers 1 2]
    .venv/bin/python pipelines/bench/loader_throughput.py --profile   # + cProfile of ours and bare in-process
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from mmpretrain.data.loader import Loader, TextBranch, image_text_loader
from mmpretrain.data.records import ImageTextBatch
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.data.transforms import image_transforms
from mmpretrain.shards.resolve import ShardSource
from mmpretrain.table import format_table

TARGET = 0.9
WORDS = ("red", "small", "bright", "old", "dog", "house", "river", "tree", "car", "street", "woman", "beach", "city")


# -- shards --------------------------------------------------------------------------------------
def photo_like(size: int, seed: int, index: int) -> bytes:
    """A size x size JPEG (q95, as prepare writes) that compresses like a photo, not like flat shapes."""
    rng = np.random.default_rng((seed, index))
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)  # (5, 5, 3): smooth blobs once upsampled
    canvas = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        box = (x0, y0, x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(canvas, np.int16) + rng.integers(-8, 9, (size, size, 3), dtype=np.int16)  # (S, S, 3)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()


def _write_shard(job: tuple[Path, int, int, int, int]) -> None:
    path, size, seed, first, count = job
    with wds.TarWriter(str(path), mtime=0) as sink:
        for index in range(first, first + count):
            image = photo_like(size, seed, index)
            words = np.random.default_rng((seed, index, 1)).choice(WORDS, 6 + index % 10)
            caption = "a photo of a " + " ".join(words) + f" number {index}"
            meta = {"key": f"{index:09d}", "caption": caption, "width": size, "height": size,
                    "sha256": hashlib.sha256(image).hexdigest()}
            sink.write({"__key__": f"{index:09d}", "jpg": image, "txt": caption, "json": meta})


def make_shards(folder: Path, num: int, size: int, shard_size: int, seed: int) -> list[str]:
    """bench-NNNNNN.tar + sizes.json in FOLDER, unless a previous call wrote the same ones."""
    marker, want = folder / ".bench.json", {"num": num, "size": size, "shard_size": shard_size, "seed": seed}
    counts = {f"bench-{i:06d}.tar": min(shard_size, num - first) for i, first in enumerate(range(0, num, shard_size))}
    if not (marker.is_file() and json.loads(marker.read_text()) == want):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        jobs = [(folder / name, size, seed, i * shard_size, n) for i, (name, n) in enumerate(counts.items())]
        with mp.get_context("fork").Pool() as pool:
            pool.map(_write_shard, jobs, chunksize=1)
        (folder / "sizes.json").write_text(json.dumps(counts))
        marker.write_text(json.dumps(want))
        print(f"wrote {num} samples in {len(counts)} shards in {time.perf_counter() - start:.1f} s", flush=True)
    return [str(folder / name) for name in counts]


# -- the loaders ---------------------------------------------------------------------------------
def ours(folder: Path, args, tokenizer: Tokenizer, workers: int, text: bool = False):
    cfg = StreamConfig(shards=(ShardSource(str(folder)),), batch_size=args.batch_size, shuffle_buffer=args.buffer)
    return image_text_loader(cfg, tokenizer=tokenizer, transform=image_transforms(args.image_size, train=True),
                             num_workers=workers, text_branch=TextBranch() if text else None)


def _bare_collate(tokenizer: Tokenizer, samples: list[tuple]) -> tuple:
    images, captions = zip(*samples)
    return torch.stack(images), tokenizer.encode(list(captions)).ids  # (B, 3, S, S), (B, L)


def bare(urls: list[str], args, tokenizer: Tokenizer):
    return (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)  # split by worker
          .shuffle(args.buffer, initial=args.buffer)  # fill the whole buffer first, as ours does
          .decode("pil").to_tuple("jpg;png;webp", "txt")
          .map_tuple(image_transforms(args.image_size, train=True), str.strip)
          .batched(args.batch_size, collation_fn=partial(_bare_collate, tokenizer), partial=False))


def epoch(loader, snap: dict | None = None) -> int:
    """Samples in one epoch. With `snap`, also keeps the loader's state after snap["at"] batches and the
    keys of the batch that follows (for the resume check), at the cost of one small dict copy."""
    n = 0
    for i, batch in enumerate(loader):
        n += len(batch.images if isinstance(batch, ImageTextBatch) else batch[0])
        if snap is not None and i == snap["at"] - 1:
            snap["state"] = loader.state_dict()
        elif snap is not None and i == snap["at"]:
            snap["keys"] = batch.keys
    return n


def first_batch(loader) -> tuple[float, list]:
    """(seconds from iter() to the first batch, its keys); then stops the DataLoader workers."""
    start, it = time.perf_counter(), iter(loader)
    batch = next(it)
    wall = time.perf_counter() - start
    it.close()
    return wall, batch.keys


# -- timing --------------------------------------------------------------------------------------
def measure_all(jobs: dict, repeat: int) -> dict:
    """Best (wall s, CPU s) and samples per job; interleaved so a burst of load hits all jobs alike.
    CPU counts this process and its reaped children (DataLoader workers are joined after an epoch)."""
    def cpu_seconds() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    best = {key: (float("inf"), float("inf"), 0) for key in jobs}
    for _ in range(repeat):
        for key, fn in jobs.items():
            wall, used = time.perf_counter(), cpu_seconds()
            n = fn()
            wall, used = time.perf_counter() - wall, cpu_seconds() - used
            best[key] = (min(best[key][0], wall), min(best[key][1], used), n)
    return best


def resume_cost(folder: Path, args, tokenizer: Tokenizer, snap: dict) -> tuple[float, float]:
    """Best (fresh, restored) iter() -> first batch of 1-worker loaders over --repeat tries."""
    fresh, restored = float("inf"), float("inf")
    for _ in range(args.repeat):
        fresh = min(fresh, first_batch(ours(folder, args, tokenizer, 1))[0])
        loader = ours(folder, args, tokenizer, 1)
        loader.load_state_dict(snap["state"])
        wall, keys = first_batch(loader)
        if keys != snap["keys"]:
            raise RuntimeError("the restored loader did not continue with the batch the uninterrupted one gave")
        restored = min(restored, wall)
    return fresh, restored


def profile(label: str, batches, count: int, top: int) -> None:
    prof = cProfile.Profile()
    prof.runcall(lambda: sum(1 for _ in itertools.islice(batches, count)))
    print(f"\n== cProfile: {label}, {count} batches in-process (top {top} by own time) ==")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=10_000, help="samples in the shards")
    p.add_argument("--image-size", type=int, default=224, help="stored and transformed image size (px)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (samples), both loaders")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers (0: in-process)")
    p.add_argument("--repeat", type=int, default=2, help="timed epochs per measurement; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the shards (default: a temp dir, removed)")
    p.add_argument("--profile", action="store_true", help="also cProfile ours and bare in-process")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="loader_bench_"))
    try:
        return _bench(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _print_table(best: dict) -> bool:
    rows, ok = [], True
    for (kind, w), (wall, used, n) in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        ratio, cpu_ratio = best["bare", w][0] / wall, best["bare", w][1] / used
        verdict = "" if kind != "ours" else "PASS" if ratio >= TARGET else "FAIL"
        ok &= kind != "ours" or ratio >= TARGET
        rows.append([kind, w, n, f"{n / wall:.1f}", f"{n / wall / max(w, 1):.1f}", "" if kind == "bare" else f"{ratio:.2f}",
                     verdict, f"{used / n * 1e3:.2f}", "" if kind == "bare" else f"{cpu_ratio:.2f}"])
    print("\nrate: samples per second of wall time over one epoch from iter() (workers start, decode, "
          "transform, tokenize, collate); per worker: divided by max(W, 1)\nratio: ours / bare at the same "
          f"worker count; target {TARGET} (ours+text shows what MLM/AR masking costs; not judged)\nCPU: user+sys "
          "of the main process and its workers per sample, least-loaded run, and bare / this; less disturbed by "
          "other load than wall time\n")
    print(format_table(["loader", "workers", "samples", "samples/s", "samples/s per worker",
                        "ratio", "result", "CPU ms/sample", "CPU ratio"], rows))
    return ok


def _bench(args, work: Path) -> int:
    folder = work / f"shards-{args.image_size}"
    urls = make_shards(folder, args.num, args.image_size, args.shard_size, args.seed)
    torch.set_num_threads(1)  # as in DataLoader workers; W=0 and the profile then match a worker's work
    cores, mb = len(os.sched_getaffinity(0)), sum(os.path.getsize(u) for u in urls) / 1e6
    print(f"cores available: {cores} (os.cpu_count() = {os.cpu_count()}); shards: {args.num} x {args.image_size} px "
          f"JPEG in {len(urls)} tars, {mb:.0f} MB; batch {args.batch_size}, shuffle buffer {args.buffer}; "
          f"best of {args.repeat}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    tokenizer, loaders = Tokenizer(), {}
    for w in args.workers:
        loaders["bare", w] = wds.WebLoader(bare(urls, args, tokenizer), batch_size=None, num_workers=w)
        loaders["ours", w] = ours(folder, args, tokenizer, w)
    loaders["ours+text", args.workers[0]] = ours(folder, args, tokenizer, args.workers[0], text=True)
    for url in urls:  # warm-up: shards into the page cache, then a few batches through every loader
        Path(url).read_bytes()
    for loader in loaders.values():
        sum(1 for _ in itertools.islice(loader, 3))
        if isinstance(loader, Loader):
            loader.set_epoch(0)

    snap = {"at": len(loaders["ours", args.workers[0]]) // 2}  # resume state, taken in the W=1 epoch
    jobs = {key: partial(epoch, loader, snap if key == ("ours", 1) else None) for key, loader in loaders.items()}
    best = measure_all(jobs, args.repeat)
    ok = _print_table(best)
    if "state" in snap:
        (fresh, restored), skipped = resume_cost(folder, args, tokenizer, snap), snap["state"]["samples"]
        print(f"\nresume (1 worker): state taken {snap['at']} batches = {skipped} samples into the epoch; iter() -> "
              f"first batch {restored:.2f} s restored vs {fresh:.2f} s fresh (the batch the uninterrupted epoch gave)"
              f"\nskip cost: {(restored - fresh) / skipped * 1e4:.2f} s per 10k skipped samples; decoding and "
              f"transforming 10k at the bare 1-worker rate takes {1e4 * best['bare', 1][0] / best['bare', 1][2]:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on this machine distort the "
          "numbers; above ~0.5 before the run, re-run on a quiet machine)")
    if args.profile:
        stream = ours(folder, args, tokenizer, 0).stream
        count = min(20, len(loaders["ours", args.workers[0]]))
        profile("ours (loader.stream)", iter(stream), count, 20)
        profile("bare (the WebDataset pipeline)", iter(bare(urls, args, tokenizer)), count, 20)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
