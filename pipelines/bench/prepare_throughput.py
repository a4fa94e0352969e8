"""Throughput of `mmpretrain prepare` against a bare Pillow loop on the same images.

What is compared, per output size S (default 256 and 64 px):

* bare: one process, a plain Pillow loop over the same sources: read the file's bytes,
  ``Image.open``, ``img.draft("RGB", (S, S))`` (JPEG DCT-domain downscaling, as a well-written
  loop would), center-crop bicubic resize to S x S, JPEG encode at quality 95 into memory.
  No caption, no hashing, no tar: the core work only.
* prepare: ``run_prepare`` called in this process on the folder source (image + same-stem .txt),
  fresh output folder per run, ``--val-fraction 0``, no progress bar. The timed span is the whole
  call: folder walk, worker pool start, decode/resize/encode, captions, hashing, tar writing, fsync
  and the final json files. Python start-up and imports are not timed (they are done once before).

Target (from the issue): prepare >= 0.9 x bare x workers. With as many workers as cores the main
process (which writes the tar) competes with the workers, so the target is harder to reach there.

Engines and output locations (each against the local engine writing to a local folder, the same
sources, sizes and worker count, interleaved in the same run; the local figure is the 1-worker one for
--s3 and the 2-worker one for --engine ray):

* ``--s3``: ``--out s3://BUCKET/prefix`` on an S3-compatible server this script starts on 127.0.0.1
  (moto's standalone server, the one the tests use; ``make install`` brings it). Real HTTP through
  s3fs/botocore; the server shares this machine's cores. Target: >= 0.9 x the local rate.
  ``--s3-url s3://bucket/prefix`` measures a real bucket instead (credentials and endpoint from the
  standard AWS variables; the prefix is deleted after each run).
* ``--engine ray``: ``--engine ray`` on a local Ray cluster this script starts (two nodes of 1 CPU,
  ``ray.cluster_utils.Cluster``), or the one named by ``--ray-address``. Target: >= 0.8 x the local
  engine with 2 workers on the same cores.

Sources: --num photo-sized (640x480) JPEGs at quality 90, drawn from numpy generators seeded by
(--seed, image index): gradients, smooth colour blobs, a few shapes and mild noise, so they
compress like photos (~60 KB) rather than like pure noise. They are kept in --work and reused when
the same --num and --seed are asked for again.

    .venv/bin/python pipelines/bench/prepare_throughput.py [--num 2000] [--sizes 256 64] [--workers 1 2]
    .venv/bin/python pipelines/bench/prepare_throughput.py --profile   # + cProfile of both at the smallest size
    .venv/bin/python pipelines/bench/prepare_throughput.py --s3 --engine ray --sizes 64 --workers 1 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmpretrain import storage
from mmpretrain.prepare.images import ImageOptions
from mmpretrain.prepare.pipeline import PrepareOptions, run_prepare
from mmpretrain.table import format_table

SOURCE_SIZE = (640, 480)
WARMUP_IMAGES = 64
TARGET = 0.9
ENGINE_TARGETS = {"s3": 0.9, "ray": 0.8}  # rate of the variant / rate of the local engine, local folder
BENCH_SHARD_SIZE = 250  # inputs per block: several blocks for Ray to spread over its nodes
WORDS = ("red", "small", "bright", "quiet", "old", "round", "dog", "house", "river", "tree", "car", "street")


# -- sources -------------------------------------------------------------------------------------
def photo_like(seed: int, index: int) -> bytes:
    """A 640x480 JPEG that compresses like a photo: smooth structure plus a little sensor-like noise."""
    rng = np.random.default_rng((seed, index))
    w, h = SOURCE_SIZE
    c = rng.uniform(0, 255, (3, 3)).astype(np.float32)  # three corner colours
    gx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]  # (1, W, 1)
    gy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    gradient = c[0] + gx * (c[1] - c[0]) + gy * (c[2] - c[0]) * 0.5  # (H, W, 3)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # (6, 8, 3): blobs after upsampling
    blobs = Image.fromarray(coarse).resize(SOURCE_SIZE, Image.Resampling.BICUBIC)
    canvas = Image.fromarray((0.5 * gradient + 0.5 * np.asarray(blobs, np.float32)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = (x0, y0, x0 + int(rng.integers(30, 250)), y0 + int(rng.integers(30, 200)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    canvas = canvas.filter(ImageFilter.BoxBlur(1))
    # ±8 uniform noise puts quality-90 files at ~60 KB; pure noise would be ~300 KB, unlike photos.
    noisy = np.asarray(canvas, np.int16) + rng.integers(-8, 9, (h, w, 3), dtype=np.int16)  # (H, W, 3)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write_one(job: tuple[Path, int, int]) -> None:
    folder, seed, index = job
    (folder / f"{index:06d}.jpg").write_bytes(photo_like(seed, index))
    rng = np.random.default_rng((seed, index, 1))
    caption = "a photo of a " + " ".join(rng.choice(WORDS, 4)) + f" number {index}"
    (folder / f"{index:06d}.txt").write_text(caption)


def make_sources(folder: Path, num: int, seed: int) -> None:
    """Writes NUM image + caption pairs into FOLDER unless a previous call already did."""
    marker = folder / ".bench.json"
    want = {"num": num, "seed": seed, "size": SOURCE_SIZE}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(want)):
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    with mp.get_context("fork").Pool() as pool:  # every image has its own seed: any order is fine
        pool.map(_write_one, [(folder, seed, i) for i in range(num)], chunksize=32)
    marker.write_text(json.dumps(want))
    print(f"generated {num} sources in {time.perf_counter() - start:.1f} s", flush=True)


# -- the two things measured ---------------------------------------------------------------------
def bare_loop(paths: list[Path], size: int) -> None:
    """Read, draft-decode, center-crop bicubic resize, JPEG-encode; what prepare's core work is."""
    for path in paths:
        img = Image.open(io.BytesIO(path.read_bytes()))
        img.draft("RGB", (size, size))  # Pillow keeps both sides >= size: the crop never upsamples
        if img.mode != "RGB":  # convert() of an RGB image is a full copy; prepare skips it too
            img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img.resize((size, size), Image.Resampling.BICUBIC, box=box).save(io.BytesIO(), "JPEG", quality=95)


def prepare_once(source: Path, out: str, size: int, workers: int, engine: str = "local",
                 ray_address: str | None = None) -> None:
    """One timed prepare run into an empty output (cleared by `clear` before, not timed): a fresh
    run, as a user's first one is (--overwrite would add its deletes, a few requests on s3)."""
    opts = PrepareOptions(out=out, image=ImageOptions(image_size=size), val_fraction=0.0, workers=workers,
                          progress=False, shard_size=BENCH_SHARD_SIZE, engine=engine,
                          ray_address=ray_address)
    stats = run_prepare([str(source)], opts)
    if stats["failed"]:
        raise RuntimeError(f"prepare failed {stats['failed']} samples: {stats['reasons']}")


def clear(out: str) -> None:
    storage.remove(out, recursive=True)


def measure(job) -> tuple[float, float]:
    """(wall s, CPU s) of one call of `job` (a function, or (function, setup) where setup runs
    untimed first); CPU counts this process and its reaped children (pool workers), not a server's
    or a Ray cluster's processes."""
    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    fn, setup = job if isinstance(job, tuple) else (job, None)
    if setup is not None:
        setup()
    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


def measure_all(jobs: dict, repeat: int) -> dict:
    """Best (least disturbed) wall and CPU time per job. Jobs run interleaved, repeat after repeat,
    so a burst of load elsewhere on the machine hits bare and prepare alike."""
    best = {key: (float("inf"), float("inf")) for key in jobs}
    for _ in range(repeat):
        for key, fn in jobs.items():
            wall, used = measure(fn)
            best[key] = (min(best[key][0], wall), min(best[key][1], used))
    return best


def profile(label: str, fn, top: int) -> None:
    prof = cProfile.Profile()
    prof.runcall(fn)
    print(f"\n== cProfile: {label} (top {top} by own time) ==")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=2000, help="source images")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 64], help="output sizes (px)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare worker counts")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per measurement; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for sources and outputs (default: a temp dir, removed)")
    p.add_argument("--profile", action="store_true", help="also cProfile bare and 1-worker prepare")
    p.add_argument("--s3", action="store_true", help="also --out s3:// on a local S3-compatible server")
    p.add_argument("--s3-url", help="also --out this s3:// prefix (a real bucket; deleted after each run)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: also --engine ray on a local 2-node cluster (or --ray-address)")
    p.add_argument("--ray-address", help="an existing Ray cluster for --engine ray")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        return _bench(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> int:
    with ExitStack() as stack:
        s3_out = args.s3_url or (stack.enter_context(local_s3(work)) if args.s3 else None)
        ray_address = (args.ray_address or stack.enter_context(local_ray())) if args.engine == "ray" else None
        return _measure_all(args, work, s3_out, ray_address)


@contextmanager
def local_s3(work: Path):
    """An S3-compatible server on 127.0.0.1 (tests/s3server.py), its endpoint and credentials in the
    environment as a user's would be; yields the output prefix in a fresh bucket."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from helpers import free_port
    from s3server import S3Server

    work.mkdir(parents=True, exist_ok=True)
    server = S3Server(free_port(), work / "moto.log").start()
    os.environ.update(server.env)
    try:
        yield server.new_bucket() + "/bench"
    finally:
        server.stop()


CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the bench closes it
cluster.shutdown()
"""


@contextmanager
def local_ray():
    """Two Ray nodes of 1 CPU each on this machine; yields the cluster's address. The nodes are
    started by a child process, so that this (measured) process is only a Ray client, as a user's is."""
    child = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = child.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the local Ray cluster did not start (exit code {child.wait()})")
        yield address
    finally:
        import ray

        ray.shutdown()
        child.stdin.close()
        child.wait(60)


def _measure_all(args, work: Path, s3_out: str | None, ray_address: str | None) -> int:
    source, warm, out = work / "sources", work / "warmup", str(work / "out")
    make_sources(source, args.num, args.seed)
    paths = sorted(source.glob("*.jpg"))
    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores} (os.cpu_count() = {os.cpu_count()}); sources: {len(paths)} x "
          f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG q90, mean {_mean_kb(paths):.0f} KB; "
          f"best of {args.repeat} runs; load average before: {os.getloadavg()[0]:.2f}")
    if max(args.workers) >= cores:
        print(f"warning: with {max(args.workers)} workers on {cores} cores the main process (tar writing) "
              "competes with the workers for CPU, so scaling by workers is optimistic there")

    # Warm-up: every source into the page cache, Pillow's codecs and prepare's imports loaded.
    shutil.rmtree(warm, ignore_errors=True)
    warm.mkdir(parents=True)
    for path in paths[:WARMUP_IMAGES]:
        for f in (path, path.with_suffix(".txt")):
            shutil.copyfile(f, warm / f.name)
    bare_loop(paths, min(args.sizes))
    variants = {}  # name -> (output, engine, local worker count it is compared with)
    if s3_out:
        variants["s3"] = (s3_out, "local", min(args.workers))
    if ray_address:
        variants["ray"] = (str(work / "out-ray"), "ray", 2)
    compared = sorted({w for _, _, w in variants.values()} - set(args.workers))
    for w in [*args.workers, *compared]:
        clear(out)
        prepare_once(warm, out, min(args.sizes), w)
    for dest, engine, w in variants.values():
        clear(dest)
        prepare_once(warm, dest, min(args.sizes), w, engine, ray_address)

    jobs = {}
    for size in args.sizes:
        jobs[size, 0] = partial(bare_loop, paths, size)  # workers 0: the bare loop
        for workers in [*args.workers, *compared]:
            jobs[size, workers] = (partial(prepare_once, source, out, size, workers), partial(clear, out))
        for name, (dest, engine, w) in variants.items():
            jobs[size, name] = (partial(prepare_once, source, dest, size, w, engine, ray_address), partial(clear, dest))
    best, n, rows, ok = measure_all(jobs, args.repeat), len(paths), [], True
    for size in args.sizes:
        bare_wall, bare_cpu = best[size, 0]
        for workers in args.workers:
            wall, used = best[size, workers]
            ratio = bare_wall / (wall * workers)  # = prepare rate / (bare rate x workers)
            ok &= ratio >= TARGET
            rows.append([size, workers, f"{n / wall:.1f}", f"{n / bare_wall:.1f}",
                         f"{TARGET * workers * n / bare_wall:.1f}", f"{ratio:.2f}",
                         "PASS" if ratio >= TARGET else "FAIL", f"{used / n * 1e3:.2f} / {bare_cpu / n * 1e3:.2f}"])
    print("\nprepare: wall time of run_prepare() in-process (walk, pool, decode/resize/encode, captions, "
          "sha256, tar + fsync, json files)\nbare: one process, read + draft decode + crop-resize + "
          "JPEG encode, nothing written\nCPU: user+sys of all processes (main + workers), least-loaded run; "
          "less disturbed by other load than wall time\n")
    print(format_table(["size", "workers", "prepare samples/s", "bare samples/s (1 core)",
                        f"target ({TARGET} x bare x workers)", "ratio", "result",
                        "CPU ms/sample prepare / bare"], rows))

    if variants:
        ok &= _print_variants(best, variants, args.sizes, n)
    for dest, _, _ in variants.values():
        clear(dest)
    clear(out)
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on this machine distort the "
          "numbers; above ~0.5 before the run, re-run on a quiet machine)")
    if args.profile:
        size = min(args.sizes)
        profile(f"bare loop, {size} px", lambda: bare_loop(paths, size), 20)
        clear(out)
        profile(f"prepare, {size} px, 1 worker", lambda: prepare_once(source, out, size, 1), 30)
        clear(out)
    return 0 if ok else 1


def _print_variants(best: dict, variants: dict, sizes: list[int], n: int) -> bool:
    rows, ok = [], True
    for size in sizes:
        for name, (dest, _, w) in variants.items():
            local, other = best[size, w][0], best[size, name][0]
            ratio, target = local / other, ENGINE_TARGETS[name]
            ok &= ratio >= target
            where = f"--out {dest}" if name == "s3" else f"--engine ray ({dest})"
            rows.append([size, name, w, f"{n / local:.1f}", f"{n / other:.1f}", f"{ratio:.2f}", target,
                         "PASS" if ratio >= target else "FAIL", where])
    print("\nengines and output locations against the local engine on a local folder (same size, same "
          "worker count, same run)\n")
    print(format_table(["size", "variant", "workers", "local samples/s", "variant samples/s", "ratio",
                        "target", "result", "run"], rows))
    return ok


def _mean_kb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / len(paths) / 1e3


if __name__ == "__main__":
    sys.exit(main())
