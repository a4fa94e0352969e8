"""Peak extra memory and time of CLIP loss forward+backward: open_clip's ClipLoss vs our tiled clip_loss.

Every measurement runs in its own subprocess so that peaks do not mix. See README.md
(`contrastive_memory.py`) for what is measured and how; `--help` for the options.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
import weakref

METHODS = ("ClipLoss", "tiled")
TARGET_MEMORY, TARGET_TIME = 1 / 16, 1.5  # tiled / ClipLoss at the largest size
GIB = 2**30


# ---------------------------------------------------------------- worker side (one subprocess each)

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets VmHWM (peak RSS) to the current RSS and returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def _loss_fn(method: str, tile: int):
    from open_clip.loss import ClipLoss

    from mmpretrain.losses import clip_loss

    if method == "ClipLoss":
        return ClipLoss()  # one process: the plain open_clip computation
    return lambda img, txt, s: clip_loss(img, txt, s, tile_size=tile)["loss"]


def _inputs(batch: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07)).requires_grad_()  # open_clip's initial log-scale
    return img, txt, scale


def _step(fn, img, txt, log_scale) -> None:
    for t in (img, txt, log_scale):
        t.grad = None
    fn(img, txt, log_scale.exp()).backward()


def measure(method: str, batch: int, dim: int, tile: int, repeat: int) -> dict:
    """Peak RSS above the post-input baseline over the first step, and the best step time."""
    fn = _loss_fn(method, tile)
    _step(fn, *_inputs(256, dim))  # warm up thread pools and kernels outside the measurement
    img, txt, log_scale = _inputs(batch, dim)
    gc.collect()
    base = _reset_peak_rss()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        _step(fn, img, txt, log_scale)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _status_kib("VmHWM") * 1024 - base
    return {"peak_bytes": peak, "seconds": min(times), "repeats": repeat}


class _LiveBytes:
    """A dispatch mode that adds up the bytes of every storage an op creates and subtracts them when
    the storage dies: live tensor memory at every op boundary, and its peak."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage"):
                        tracker.add(t.untyped_storage())
                return out

        self.mode, self.seen, self.live, self.peak = Mode(), WeakIdKeyDictionary(), 0, 0

    def add(self, storage) -> None:
        if storage in self.seen:
            return
        self.seen[storage] = True
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.sub, size)

    def sub(self, size: int) -> None:
        self.live -= size


def count(method: str, batch: int, dim: int, tile: int) -> dict:
    """The same step on fake tensors (no memory allocated): peak live bytes of the tensors it creates."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = _loss_fn(method, tile)
    with FakeTensorMode():
        img, txt, log_scale = _inputs(batch, dim)
        tracker = _LiveBytes()
        with tracker.mode:
            _step(fn, img, txt, log_scale)
    return {"peak_bytes": tracker.peak}


# ---------------------------------------------------------------- driver side


def _run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.0f} MiB"


def _cell(result: dict, key: str) -> str:
    value = result.get(key)
    if value is None:
        return "-"
    text = _gb(value) if key == "peak_bytes" else f"{value:.2f} s"
    note = result.get("notes", {}).get(key)  # how a value that was not measured was obtained
    return text + (f" [{note}]" if note else "")


def _collect(sizes: list[int], dim: int, tile: int, repeat: int, headroom: float) -> dict:
    """Counts ClipLoss everywhere, measures it where the count fits in memory, measures tiled."""
    results: dict = {}
    last_measured = None
    for batch in sizes:
        reps = repeat if batch <= 8192 else 1
        counted = _run_worker(["count", "ClipLoss", str(batch), str(dim), str(tile)])["peak_bytes"]
        clip = {"counted": counted}
        need, available = counted * (1 + headroom), _mem_available()
        if need < available:
            clip.update(_run_worker(["measure", "ClipLoss", str(batch), str(dim), str(tile), str(reps)]),
                        source="measured")
            last_measured = (batch, clip["seconds"])
        else:
            print(f"ClipLoss at B={batch}: counted {_gb(counted)} (+{headroom:.0%} headroom) > MemAvailable "
                  f"{_gb(available)}; not run. Its memory is the exact count of live tensor bytes "
                  f"[counted]; its time is scaled as B² from B={last_measured[0] if last_measured else '?'} "
                  f"[B² extrapolated].", flush=True)
            clip.update(peak_bytes=counted, source="counted",
                        notes={"peak_bytes": "counted", "seconds": "B² extrapolated"})
            if last_measured:
                clip["seconds"] = last_measured[1] * (batch / last_measured[0]) ** 2
        tiled = _run_worker(["measure", "tiled", str(batch), str(dim), str(tile), str(reps)])
        tiled.update(source="measured", counted=_run_worker(["count", "tiled", str(batch), str(dim), str(tile)])["peak_bytes"])
        results[batch] = {"ClipLoss": clip, "tiled": tiled}
        print(f"  done B={batch}", flush=True)
    return results


def _report(results: dict, dim: int, tile: int) -> bool:
    import torch

    print(f"\nforward+backward, float32 CPU, d={dim}, tile={tile}, torch threads={torch.get_num_threads()}; "
          "memory = peak RSS above the inputs (counted = peak live tensor bytes on fake tensors)")
    header = ("B", "ClipLoss mem", "ClipLoss counted", "tiled mem", "tiled counted", "mem ratio",
              "ClipLoss time", "tiled time", "time ratio")
    rows = []
    for batch, r in results.items():
        clip, tiled = r["ClipLoss"], r["tiled"]
        mem_ratio = tiled["peak_bytes"] / clip["peak_bytes"]
        time_ratio = tiled["seconds"] / clip["seconds"] if clip.get("seconds") else float("nan")
        rows.append((str(batch), _cell(clip, "peak_bytes"), _gb(clip["counted"]), _gb(tiled["peak_bytes"]),
                     _gb(tiled["counted"]), f"1/{1 / mem_ratio:.0f}" if mem_ratio < 0.5 else f"{mem_ratio:.2f}", _cell(clip, "seconds"),
                     _cell(tiled, "seconds"), f"{time_ratio:.2f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    batch = max(results)
    clip, tiled = results[batch]["ClipLoss"], results[batch]["tiled"]
    mem_ok = tiled["peak_bytes"] <= clip["peak_bytes"] * TARGET_MEMORY
    time_ok = bool(clip.get("seconds")) and tiled["seconds"] <= clip["seconds"] * TARGET_TIME
    note = "" if clip["source"] == "measured" else " (ClipLoss side counted / B²-extrapolated, not measured)"
    print(f"\nB={batch}{note}: memory {'PASS' if mem_ok else 'FAIL'} (tiled ≤ 1/16 of ClipLoss), "
          f"time {'PASS' if time_ok else 'FAIL'} (tiled ≤ {TARGET_TIME}× ClipLoss)")
    return mem_ok and time_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=None, help="tile size (default: the library default)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per size up to B=8192 (1 above)")
    parser.add_argument("--headroom", type=float, default=0.15,
                        help="run ClipLoss only where its counted need plus this fraction fits in MemAvailable")
    parser.add_argument("--tiles", type=int, nargs="*", help="only time tiled at --sizes[0] for these tile sizes")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.worker:
        kind, method, batch, dim, tile, *rest = args.worker
        fn = measure if kind == "measure" else count
        print(json.dumps(fn(method, int(batch), int(dim), int(tile), *map(int, rest))))
        return 0
    from mmpretrain.losses.contrastive import DEFAULT_TILE_SIZE

    with open("/proc/loadavg") as fh:
        print(f"load average before: {fh.read().split()[:3]}", flush=True)
    if args.tiles:
        for tile in args.tiles:
            r = _run_worker(["measure", "tiled", str(args.sizes[0]), str(args.dim), str(tile), str(args.repeat)])
            print(f"B={args.sizes[0]} tile={tile}: {r['seconds']:.2f} s, peak {_gb(r['peak_bytes'])}", flush=True)
        return 0
    tile = args.tile or DEFAULT_TILE_SIZE
    ok = _report(_collect(sorted(args.sizes), args.dim, tile, args.repeat, args.headroom), args.dim, tile)
    with open("/proc/loadavg") as fh:
        print(f"load average after: {fh.read().split()[:3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
