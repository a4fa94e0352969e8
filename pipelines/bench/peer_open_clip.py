"""Training throughput against open_clip_train, the peer trainer, on the same model, shards and settings.

Three jobs train the same architecture (--model, mmpretrain/models/model_configs/tiny.json, in open_clip's model-config
schema) on the same image-text shards, with the same batch size, fp32 on CPU, the same torch thread
count (OMP_NUM_THREADS, --threads) and the same number of data workers (--workers):

* peer: open_clip_train 3.3 (``open_clip_train.main.main``, shipped in the open_clip_torch wheel)
  with ``--dataset-type webdataset --dataset-resampled --precision fp32 --device cpu``, the config's
  lr, weight decay, betas, eps, warmup and grad clip, ``--log-every-n-steps 1``. It runs in its
  own environment (--peer-env, default .venv-peer/), because it needs pandas and webdataset <= 0.2.86;
  torch, torchvision, open_clip_torch, pillow and numpy there are pinned to this project's versions,
  so the comparison is of the trainers, not of the builds. The model config is registered with
  ``open_clip.add_model_config`` before ``main`` runs.
* ours (text off): ``python -m mmpretrain.train --config configs/train/tiny.yaml`` with
  ``model.mlm=false model.ar=false``: the contrastive loss only, as the peer trains. Our trainer's own
  choices stay on (torch's fused AdamW, ``optim.fused``; the peer gets torch's default, a per-tensor loop
  on CPU); ``--ours-extra KEY=VALUE ...`` adds overrides to both of our jobs.
* ours (text on): the same with both text heads, MLM and AR batches made from the captions
  (``data.text_shards=[]``). Not judged: it shows what the text branch costs.

Every job is a fresh process of --steps steps. Throughput is measured the same way for all three:
the wall time from the end of step --skip to the end of step (--steps - --tail), read from each tool's
own per-step records (the peer's per-step "Batch (t)"/samples-per-second log line, which times one step
end to the next; the ``time`` stamps that our trainer writes to metrics.jsonl right after every step).
It covers data wait, forward, backward, the optimizer and each tool's per-step bookkeeping; start-up,
the first --skip steps (worker start, shuffle-buffer fill) and the last --tail steps (the peer's loader
has finished its epoch there and frees a core) are left out. samples/s = batch x steps / that time.

The jobs alternate (peer, ours off, ours on) --repeat times; the summary takes each job's median.
Target: ours (text off) >= 1.1 x the peer. The script exits with 1 if it is missed and with 2 if a
job crashes (its log tail is printed).

    make bench-peer
    .venv/bin/python pipelines/bench/peer_open_clip.py [--repeat 3 --steps 40 --workers 1 --threads 1]
    .venv/bin/python pipelines/bench/peer_open_clip.py --shards shards/demo     # reuse `make demo`'s shards
    .venv/bin/python pipelines/bench/peer_open_clip.py --ours-extra optim.fused=false   # ours with torch's default AdamW
    # on a GPU (pipelines/bench/gpu_check.sh runs this): both tools on cuda, mixed precision, peak GPU memory per job
    .venv/bin/python pipelines/bench/peer_open_clip.py --device cuda --precision bf16 \
        --model-config mmpretrain/models/model_configs/ViT-B-32.json --image-size 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mmpretrain.config import load_config
from mmpretrain.errors import UserError
from mmpretrain.table import format_table

ROOT = Path(__file__).resolve().parents[2]
TARGET = 1.1
# Pinned to the project's versions; the peer's own needs come on top (open_clip_train crashes with
# webdataset >= 0.2.96, KeyError 'fname', and imports pandas).
SAME_AS_OURS = ("torch", "torchvision", "open_clip_torch", "pillow", "numpy")
PEER_EXTRA = ("webdataset<=0.2.86", "pandas")
PEER_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,")
# The NullHandler keeps create_model's log calls from installing a second root handler (basicConfig),
# which would print every log line of the run twice.
PEER_MAIN = """import logging, sys, open_clip
logging.getLogger().addHandler(logging.NullHandler())
open_clip.add_model_config(sys.argv[1])
m = open_clip.create_model(sys.argv[2])
print('peer parameters:', sum(p.numel() for p in m.parameters()), flush=True)
from open_clip_train.main import main
main(sys.argv[3:])
"""
JOBS = ("peer", "ours (text off)", "ours (text on)")
PEER_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}  # open_clip_train's names for ours


# -- the peer's environment ----------------------------------------------------------------------
def ensure_peer_env(path: Path) -> dict:
    """Create (once) a venv with open_clip_train's needs and this project's torch stack; return its versions."""
    want = {name: importlib.metadata.version(name) for name in SAME_AS_OURS}
    spec = [f"{name}=={version}" for name, version in want.items()] + list(PEER_EXTRA)
    stamp, python = path / ".peer-installed", path / "bin" / "python"
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == spec and python.exists():
        return json.loads(stamp.read_text())["versions"]
    uv = Path(sys.executable).with_name("uv")
    if not uv.exists():
        sys.exit(f"{uv} not found: run `make install` first (it installs uv into .venv)")
    print(f"creating the peer environment {path} (once; about a minute from a cold cache)", flush=True)
    start = time.perf_counter()
    subprocess.run([str(uv), "venv", "-q", "--allow-existing", str(path), "--python", "3.11"], check=True)
    # bytecode compiled now rather than in the first timed run's start-up
    subprocess.run([str(uv), "pip", "install", "-q", "--compile-bytecode", "--python", str(python), *spec], check=True)
    probe = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    names = [*SAME_AS_OURS, "webdataset", "pandas"]
    versions = json.loads(subprocess.run([str(python), "-c", probe, *names], check=True, capture_output=True,
                                         text=True).stdout)
    if any(versions[n] != want[n] for n in SAME_AS_OURS):
        sys.exit(f"the peer environment did not get the project's versions: {versions} vs {want}")
    stamp.write_text(json.dumps({"spec": spec, "versions": versions}, indent=2))
    print(f"peer environment ready in {time.perf_counter() - start:.0f} s", flush=True)
    return versions


# -- shards --------------------------------------------------------------------------------------
def make_shards(args, work: Path) -> tuple[list[Path], int]:
    """(train tars, sample count): --shards (a prepare output folder or its train/), or fresh demo data."""
    if args.shards:
        folder = args.shards / "train" if (args.shards / "train").is_dir() else args.shards
    else:
        from mmpretrain.prepare.demo import generate_demo_data
        from mmpretrain.prepare.images import ImageOptions
        from mmpretrain.prepare.pipeline import PrepareOptions, run_prepare

        start, raw = time.perf_counter(), work / "raw"
        generate_demo_data(raw, num_images=args.images, image_size=args.image_size, num_documents=10)
        run_prepare([str(raw / "folder"), str(raw / "manifest.csv")],
                    PrepareOptions(out=str(work / "shards"), image=ImageOptions(image_size=args.image_size),
                                   shard_size=500, val_fraction=0.05, workers=2, progress=False))
        folder = work / "shards" / "train"
        print(f"demo data: {args.images} images at {args.image_size} px, prepared in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    sizes_file = folder / "sizes.json"
    if not sizes_file.exists():
        sys.exit(f"{sizes_file} not found: --shards must be a `mmpretrain prepare` output (or its train/ folder)")
    sizes = json.loads(sizes_file.read_text())
    return [folder / name for name in sorted(sizes)], sum(sizes.values())


# -- the three jobs ------------------------------------------------------------------------------
def peer_command(args, cfg, tars: list[Path], run: Path) -> list[str]:
    o = cfg.optim
    return [str(args.peer_env / "bin" / "python"), "-c", PEER_MAIN, str(args.model_config), args.model_config.stem,
            "--train-data", "::".join(map(str, tars)), "--train-num-samples", str(args.steps * args.batch_size),
            "--dataset-type", "webdataset", "--dataset-resampled", "--batch-size", str(args.batch_size),
            "--epochs", "1", "--workers", str(args.workers), "--model", args.model_config.stem,
            "--precision", PEER_PRECISION[args.precision], "--device", args.device, "--log-every-n-steps", "1",
            "--save-frequency", "0",
            "--logs", str(run), "--name", "peer", "--report-to", "", "--seed", str(cfg.train.seed),
            "--lr", str(o.lr), "--wd", str(o.weight_decay), "--beta1", str(o.beta1), "--beta2", str(o.beta2),
            "--eps", str(o.eps), "--warmup", str(cfg.schedule.warmup_steps),
            *(["--grad-clip-norm", str(o.grad_clip)] if o.grad_clip is not None else [])]


def ours_overrides(args, tars: list[Path], run: Path, text: bool) -> list[str]:
    return [f"model.name={args.model_config}", f"model.mlm={str(text).lower()}", f"model.ar={str(text).lower()}",
            f"data.train_shards=['{tars[0].parent}']", "data.text_shards=[]", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", "data.mode=resampled", f"train.precision={args.precision}",
            f"train.steps={args.steps}", "train.checkpoint_every=0", f"train.output_dir={run}", "eval.every=0",
            "logging.trackers=[]", "logging.log_every=1", "logging.progress=false", *args.ours_extra]


class GpuMemory:
    """Peak GPU memory of one job's process as nvidia-smi reports it (all it holds: the caching
    allocator's reserve and the CUDA context, the same for both tools), polled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak_mib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.2):
            out = subprocess.run(query, capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_mib = max(self.peak_mib, int(used))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def run_job(cmd: list[str], log: Path, env: dict, gpu: bool = False) -> tuple[float, int | None]:
    """Run one job to its end, output into `log`; (wall time, peak GPU MiB or None). Exits with 2 (and
    the log's tail) on failure."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        memory = GpuMemory(proc.pid) if gpu else None
        code = proc.wait()
        peak = memory.stop() if memory else None
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        print(f"\n{log.stem} exited with {code}; the end of its output ({log}):\n{tail}", flush=True)
        sys.exit(2)
    return time.perf_counter() - start, peak


def peer_steps(log: Path, batch: int) -> list[tuple[float, float]]:
    """(step seconds, data-wait seconds) per step from open_clip_train's log lines (logged every step)."""
    by_count = {int(n): (batch / float(rate), float(wait)) for n, wait, rate in PEER_STEP.findall(log.read_text())}
    steps = [by_count[n] for n in sorted(by_count)]
    if not steps:
        sys.exit(f"no 'Train Epoch' step lines in {log}: has open_clip_train's log format changed?")
    return steps


def ours_steps(run: Path, batch: int) -> list[tuple[float, float]]:
    """The same from metrics.jsonl: end-to-end time between consecutive step records (step 1 has no previous
    record: its samples_per_s is used, start-up then is not in it), and data_wait x that step's own time."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    steps = [(batch / train[0]["samples_per_s"], train[0]["data_wait"] * batch / train[0]["samples_per_s"])]
    for prev, cur in zip(train, train[1:]):
        steps.append((cur["time"] - prev["time"], cur["data_wait"] * batch / cur["samples_per_s"]))
    return steps


def parameter_counts(model_config: Path) -> dict[str, int]:
    """Ours with the text heads off and on: the same dual tower as the peer's CLIP (checked against its count)."""
    from mmpretrain.models import build_model, load_model_config

    cfg = load_model_config(str(model_config))
    return {f"ours (text {s})": sum(p.numel() for p in build_model(cfg, mlm=on, ar=on).parameters())
            for s, on in (("off", False), ("on", True))}


def measure(args, steps: list[tuple[float, float]]) -> dict:
    window = steps[args.skip:len(steps) - args.tail]
    total, wait = sum(s for s, _ in window), sum(w for _, w in window)
    return {"n": len(window), "rate": args.batch_size * len(window) / total, "wait": wait / total,
            "step_ms": 1e3 * statistics.median(s for s, _ in window)}


def one_job(args, cfg, tars: list[Path], run: Path, job: str,
            env: dict) -> tuple[float, int | None, list[tuple[float, float]]]:
    """(process wall time, peak GPU MiB, per-step records) of one job in the fresh folder `run`."""
    gpu = args.device == "cuda"
    if job == "peer":
        wall, peak = run_job(peer_command(args, cfg, tars, run), run / "peer.log", env, gpu)
        return wall, peak, peer_steps(run / "peer.log", args.batch_size)
    cmd = [sys.executable, "-m", "mmpretrain.train", "--config", str(args.config),
           *ours_overrides(args, tars, run, text=job == "ours (text on)")]
    wall, peak = run_job(cmd, run / "ours.log", env, gpu)
    return wall, peak, ours_steps(run, args.batch_size)


def run_all(args, cfg, tars: list[Path], work: Path) -> dict[str, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("PYTHONPATH", None)  # neither interpreter may pick up the other's packages
    results: dict[str, list[dict]] = {job: [] for job in JOBS}
    rows, params = [], parameter_counts(args.model_config)
    for r in range(1, args.repeat + 1):
        for job in JOBS:
            run = work / f"run{r}-{job.split()[0]}{'-text' if job == 'ours (text on)' else ''}"
            run.mkdir()
            wall, peak, steps = one_job(args, cfg, tars, run, job, env)
            m = {**measure(args, steps), "wall": wall, "gpu_mib": peak}
            if job == "peer" and "peer" not in params:
                found = re.search(r"peer parameters: (\d+)", (run / "peer.log").read_text())
                params["peer"] = int(found.group(1)) if found else -1
                print(f"  parameters: {', '.join(f'{k} {v:,}' for k, v in params.items())}", flush=True)
                if params["peer"] != params["ours (text off)"]:
                    sys.exit("the peer's model and ours (text off) differ in size: not the same architecture")
            results[job].append(m)
            rows.append([job, r, m["n"], f"{m['rate']:.1f}", f"{m['step_ms']:.0f}", f"{100 * m['wait']:.1f}",
                         f"{wall:.0f}", "-" if peak is None else f"{peak}"])
            print(f"  {job:<16} run {r}: {m['rate']:.1f} samples/s over {m['n']} steps ({wall:.0f} s, load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    print("\nsamples/s: batch x steps / wall time of steps skip+1..steps-tail (end of step to end of step, from each "
          "tool's per-step log); step ms: median of those steps; wait: share of that time spent waiting for data; "
          "run s: the whole process, start-up and exit included; GPU MiB: the process's peak in nvidia-smi\n")
    print(format_table(["job", "run", "steps", "samples/s", "step ms", "wait %", "run s", "GPU MiB"], rows))
    return results


# -- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/train/tiny.yaml", help="ours, and the optimizer settings")
    p.add_argument("--model-config", type=Path, default=ROOT / "mmpretrain/models/model_configs/tiny.json", help="the architecture of both")
    p.add_argument("--batch-size", type=int, default=32, help="image-text pairs per step")
    p.add_argument("--workers", type=int, default=1, help="data workers of both (--workers, data.num_workers)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both (default: cores - workers, at least 1)")
    p.add_argument("--steps", type=int, default=40, help="steps per job")
    p.add_argument("--skip", type=int, default=10, help="first steps left out (start-up, shuffle-buffer fill)")
    p.add_argument("--tail", type=int, default=3, help="last steps left out (the peer's loader has finished its epoch)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of peer, ours off, ours on")
    p.add_argument("--images", type=int, default=1500, help="demo images to prepare")
    p.add_argument("--image-size", type=int, default=64, help="demo image size (px)")
    p.add_argument("--shards", type=Path, help="reuse a prepare output folder (or its train/) instead of demo data")
    p.add_argument("--ours-extra", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more overrides for both of our jobs, e.g. optim.fused=false (torch's default AdamW, as the peer)")
    p.add_argument("--peer-env", type=Path, default=ROOT / ".venv-peer", help="open_clip_train's environment")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both tools train")
    p.add_argument("--precision", choices=tuple(PEER_PRECISION), default="fp32",
                   help="both tools: ours train.precision, the peer's --precision fp32|amp_bf16|amp")
    args = p.parse_args(argv)
    args.threads = args.threads or max(1, cores - args.workers)
    if args.steps - args.skip - args.tail < 5:
        p.error("--steps must leave at least 5 measured steps after --skip and --tail")
    for path in (args.config, args.model_config):
        if not path.exists():
            p.error(f"{path} not found")
    try:  # a bad --ours-extra fails here, before any job runs
        cfg = load_config(args.config, [f"model.name={args.model_config}", *args.ours_extra])
    except UserError as err:
        p.error(str(err))
    versions = ensure_peer_env(args.peer_env.resolve())
    work = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    try:
        return _bench(args, cfg, versions, cores, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, cfg, versions: dict, cores: int, work: Path) -> int:
    tars, samples = make_shards(args, work)
    ours = {n: importlib.metadata.version(n) for n in ("torch", "open_clip_torch", "webdataset", "accelerate")}
    print(f"cores available: {cores}; OMP_NUM_THREADS={args.threads} and {args.workers} data worker(s) for both; "
          f"model {args.model_config.name}, batch {args.batch_size}, {args.precision} {args.device}; lr {cfg.optim.lr}, wd "
          f"{cfg.optim.weight_decay}, warmup {cfg.schedule.warmup_steps}, grad clip {cfg.optim.grad_clip}; "
          f"{len(tars)} shards, {samples} samples ({tars[0].parent}); {args.steps} steps per job, steps "
          f"{args.skip + 1}..{args.steps - args.tail} measured; {args.repeat} rounds"
          f"{'; ours also with ' + ' '.join(args.ours_extra) if args.ours_extra else ''}\n"
          f"peer: open_clip_train {versions['open_clip_torch']}, torch {versions['torch']}, webdataset "
          f"{versions['webdataset']}, pandas {versions['pandas']}; ours: torch {ours['torch']}, open_clip "
          f"{ours['open_clip_torch']}, webdataset {ours['webdataset']}, accelerate {ours['accelerate']}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    results = run_all(args, cfg, tars, work)
    med = {job: statistics.median(m["rate"] for m in results[job]) for job in JOBS}
    ratio, cost = med["ours (text off)"] / med["peer"], med["ours (text on)"] / med["ours (text off)"]
    print(f"\nsummary (medians of {args.repeat} runs; load average after: {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - start:.0f} s)")
    for job in JOBS:
        peaks = [m["gpu_mib"] for m in results[job] if m["gpu_mib"] is not None]
        print(f"  {job:<16} {med[job]:7.1f} samples/s" + (f", peak GPU {max(peaks)} MiB" if peaks else ""))
    rounds = " ".join(f"{o['rate'] / p['rate']:.2f}" for o, p in zip(results["ours (text off)"], results["peer"]))
    print(f"  ours (text off) / peer: {ratio:.2f}   target >= {TARGET}   {'PASS' if ratio >= TARGET else 'FAIL'}"
          f"   (round by round: {rounds})")
    print(f"  cost of the text branch (MLM + AR from captions): ours on / off = {cost:.2f} "
          f"({100 * (1 - cost):.0f}% fewer samples/s; not judged)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
