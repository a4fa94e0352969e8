"""Retrieval metrics at scale: our chunked ranks against the full N x N score matrix.

For each size N (captions; images are fewer: 20% of them have 2-5 captions), seeded random unit
embeddings (d = --dim) go through

* ours: ``retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size=C)`` (what
  ``retrieval_metrics`` summarises), memory O(C x N);
* full: ``scores = image_emb @ text_emb.T`` (Ni x Nt, one GEMM) and the same rank rule counted on that
  whole matrix with up to three N x N boolean temporaries (about 7 bytes per score at the peak).

Each measurement runs in its own subprocess: wall and CPU time of the call, and its peak RSS above the
baseline taken just before it (VmHWM reset through /proc/self/clear_refs); best of --repeat. Every
metric and a digest of every rank must be equal where both ran; the script exits with 1 if anything
differs or fails. The full matrix runs only where its estimated peak fits in --safety x MemAvailable
(read just before); elsewhere the row says why it did not run. The largest N that fits is added to
the sizes unless --no-largest.

    .venv/bin/python pipelines/bench/retrieval_eval.py                     # 10k 25k 50k 100k (+ largest fit)
    .venv/bin/python pipelines/bench/retrieval_eval.py --repeat 2          # steadier on a shared machine
    .venv/bin/python pipelines/bench/retrieval_eval.py --sizes 2000 5000   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mmpretrain.eval.retrieval import group_captions, rank_summary, retrieval_ranks
from mmpretrain.table import format_table

FULL_BYTES_PER_SCORE = 7.5  # float32 score + 3 live bool temporaries, + slack (measured 6.0 at N = 50k)
GIB = 2**30


# -- data ------------------------------------------------------------------------------------------
def caption_images(n: int, seed: int, multi_fraction: float) -> torch.Tensor:
    """(n,) picture id of each caption, in shuffled sample order: 1 caption per picture, or 2-5 for
    `multi_fraction` of the pictures."""
    g = torch.Generator().manual_seed(seed)
    multi = torch.rand(n, generator=g) < multi_fraction
    counts = torch.where(multi, torch.randint(2, 6, (n,), generator=g), 1)  # (n,) enough pictures for n
    num_pictures = int(torch.searchsorted(counts.cumsum(0), n)) + 1
    counts = counts[:num_pictures]
    counts[-1] -= int(counts.sum()) - n  # the last picture keeps what is left of n
    return torch.repeat_interleave(torch.arange(num_pictures), counts)[torch.randperm(n, generator=g)]


def make_data(n: int, dim: int, seed: int, multi_fraction: float):
    """(image_emb (Ni, d), text_emb (Nt, d), text_to_image (Nt,)) float32, grouped as the CLI will:
    by a per-sample image key. 0.5% of pictures are exact copies of another (same pixels, other
    bytes), so the tie rule decides some ranks."""
    picture = caption_images(n, seed, multi_fraction)
    num_pictures = int(picture.max()) + 1
    g = torch.Generator().manual_seed(seed + 1)
    base = F.normalize(torch.randn(num_pictures, dim, generator=g), dim=1)  # (P, d)
    copies = torch.randperm(num_pictures, generator=g)[: num_pictures // 200]
    base[copies] = base[(copies + 1) % num_pictures]
    noise = torch.randn(n, dim, generator=g) * (6.0 / math.sqrt(dim))  # |noise| ~ 6: R@1 ~ 0.5 at 10k
    text_emb = F.normalize(base[picture] + noise, dim=1)  # (Nt, d)
    groups = group_captions([f"{p:012x}" for p in picture.tolist()])  # stand-in for the sha256 key
    image_emb = base[picture[groups.image_rows]]  # (Ni, d), numbered as group_captions numbers them
    return image_emb, text_emb, groups.text_to_image


# -- the N x N reference ---------------------------------------------------------------------------
def full_matrix_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor):
    """(image_to_text, text_to_image) ranks from the whole score matrix, same tie rule as ours.

    Counted with numpy like ours (its compare + sum is the faster one), so the times compare the
    chunking, not two counting kernels."""
    ni, nt = len(image_emb), len(text_emb)
    scores = (image_emb @ text_emb.T).numpy()  # (Ni, Nt): the matrix the chunked version never builds
    texts, images, t2i = np.arange(nt), np.arange(ni), t2i.numpy()
    own = scores[t2i, texts]  # (Nt,) score of each caption with its image
    t2i_ranks = 1 + (scores > own).sum(0, dtype=np.int32).astype(np.int64)
    t2i_ranks += ((scores == own) & (images[:, None] < t2i[None, :])).sum(0, dtype=np.int32)
    best = np.full(ni, -np.inf, dtype=scores.dtype)
    np.maximum.at(best, t2i, own)  # best caption score per image
    first = own == best[t2i]
    best_text = np.full(ni, nt)
    np.minimum.at(best_text, t2i[first], texts[first])  # lowest caption index reaching it
    i2t_ranks = 1 + (scores > best[:, None]).sum(1, dtype=np.int32).astype(np.int64)
    i2t_ranks += ((scores == best[:, None]) & (texts[None, :] < best_text[:, None])).sum(1, dtype=np.int32)
    return torch.from_numpy(i2t_ranks), torch.from_numpy(t2i_ranks)


# -- one measurement per subprocess ----------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args) -> int:
    # A wrong estimate must end in a MemoryError here, not in the OOM killer on a shared machine.
    limit = _status_kib("VmData") * 1024 + args.mem_limit
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    image_emb, text_emb, t2i = make_data(args.n, args.dim, args.seed, args.multi_fraction)
    if args.worker == "ours":
        run = lambda: retrieval_ranks(image_emb, text_emb, t2i, chunk_size=args.chunk_size)  # noqa: E731
    else:
        run = lambda: full_matrix_ranks(image_emb, text_emb, t2i)  # noqa: E731
    retrieval_ranks(image_emb[:300], text_emb[:300], torch.arange(min(300, len(image_emb))))  # warm up MKL
    best = {"seconds": math.inf, "cpu_seconds": math.inf, "peak_mib": 0.0}
    for _ in range(args.repeat):
        gc.collect()
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS, so VmHWM - baseline is this call's peak
        wall, cpu = time.perf_counter(), time.process_time()
        i2t, t2i_ranks = run()
        best["seconds"] = min(best["seconds"], time.perf_counter() - wall)
        best["cpu_seconds"] = min(best["cpu_seconds"], time.process_time() - cpu)
        best["peak_mib"] = max(best["peak_mib"], (_status_kib("VmHWM") - baseline) / 1024)
    digest = hashlib.sha256(i2t.numpy().tobytes() + t2i_ranks.numpy().tobytes()).hexdigest()
    metrics = {**rank_summary(i2t, "image_to_text_"), **rank_summary(t2i_ranks, "text_to_image_")}
    print(json.dumps({**best, "metrics": metrics, "digest": digest, "num_images": len(image_emb)}))
    return 0


def measure(kind: str, n: int, args, mem_limit: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--dim", str(args.dim), "--seed",
           str(args.seed), "--chunk-size", str(args.chunk_size), "--multi-fraction", str(args.multi_fraction),
           "--repeat", str(args.repeat), "--mem-limit", str(int(mem_limit))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        result = {"error": f"exit {proc.returncode}: {tail}"}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  N={n} {kind}: " + (result.get("error") or f"{result['seconds']:.1f} s, "
                                 f"peak {result['peak_mib']:.0f} MiB"), flush=True)
    return result


# -- planning and reporting ------------------------------------------------------------------------
def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def full_estimate(n: int, args) -> float:
    num_images = int(caption_images(n, args.seed, args.multi_fraction).max()) + 1
    return FULL_BYTES_PER_SCORE * num_images * n


def largest_full(args, budget: float, step: int = 5000) -> int:
    """Largest multiple of `step` captions (up to the largest size asked) whose full matrix fits."""
    n = 0
    while n + step <= max(args.sizes) and full_estimate(n + step, args) <= budget:
        n += step
    return n


def run_size(n: int, args) -> tuple[dict, dict]:
    ours = measure("ours", n, args, 0.85 * mem_available())
    available, need = mem_available(), full_estimate(n, args)
    if need > args.safety * available:
        reason = (f"not run: needs ~{need / GIB:.1f} GiB ({FULL_BYTES_PER_SCORE} B x {n} captions x images), "
                  f"over {args.safety:.0%} of MemAvailable {available / GIB:.1f} GiB")
        print(f"  N={n} full: {reason}", flush=True)
        return ours, {"skipped": reason}
    return ours, measure("full", n, args, min(1.5 * need + 2 * GIB, 0.85 * available))  # + data, slack


def verdict(ours: dict, full: dict) -> str:
    for name, result in (("ours", ours), ("full", full)):
        if "error" in result or "skipped" in result:
            return f"{name} {result.get('skipped') or 'FAILED: ' + result['error']}"
    differ = [k for k in ours["metrics"] if ours["metrics"][k] != full["metrics"][k]]
    if differ or ours["digest"] != full["digest"]:
        return "DIFFER: " + (", ".join(differ) if differ else "ranks")
    time_ratio, memory_ratio = ours["seconds"] / full["seconds"], ours["peak_mib"] / full["peak_mib"]
    return (f"equal ({len(ours['metrics'])} metrics, all ranks); ours takes {time_ratio:.2f}x the time and "
            f"{memory_ratio:.3f}x the memory")


def _row(n: int, kind: str, result: dict) -> list:
    if "error" in result or "skipped" in result:
        return [n, "-", kind, "failed" if "error" in result else "not run", "-", "-", "-", "-", "-"]
    m = result["metrics"]
    return [n, result["num_images"], kind, round(result["seconds"], 2), round(result["cpu_seconds"], 2),
            round(result["peak_mib"]), round(m["image_to_text_R@1"], 4), round(m["text_to_image_R@1"], 4),
            round(m["text_to_image_mean_rank"], 2)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 25_000, 50_000, 100_000], help="captions")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-fraction", type=float, default=0.2, help="share of images with 2-5 captions")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per measurement; the best counts")
    p.add_argument("--safety", type=float, default=0.6, help="share of MemAvailable the full matrix may plan")
    p.add_argument("--no-largest", action="store_true", help="do not add the largest N the full matrix fits")
    p.add_argument("--worker", choices=["ours", "full"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mem-limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    available = mem_available()
    print(f"MemAvailable {available / GIB:.1f} GiB, the full matrix may plan {args.safety:.0%} of it; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    sizes = sorted(set(args.sizes))
    if not args.no_largest:
        fit = largest_full(args, args.safety * available)
        added = bool(fit) and fit not in sizes
        sizes = sorted(sizes + [fit]) if added else sizes
        print(f"largest N (multiple of 5000) whose full matrix fits: {fit or 'none'}"
              + (" (added)" if added else ""), flush=True)
    rows, verdicts, failed = [], [], False
    for n in sizes:
        ours, full = run_size(n, args)
        rows += [_row(n, "ours", ours), _row(n, "full N x N", full)]
        verdicts.append(f"N={n}: {verdict(ours, full)}")
        failed |= "DIFFER" in verdicts[-1] or "FAILED" in verdicts[-1]
    print(format_table(["N captions", "images", "method", "wall s", "CPU s", "peak MiB", "i2t R@1", "t2i R@1",
                        "t2i mean rank"], rows))
    print("\n".join(verdicts))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
