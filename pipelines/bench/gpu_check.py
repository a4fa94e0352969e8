"""What one CUDA GPU shows about mmpretrain, in under 10 minutes: run by pipelines/bench/gpu_check.sh.

1. tests: the `cuda` test subset (tests/test_cuda.py).
2. ViT-B/32 training, bf16 and fp16, on synthetic 224 px shards: ours and open_clip_train side by
   side (pipelines/bench/peer_open_clip.py --device cuda: same shards, batch, optimizer settings),
   samples/s, the process's peak GPU memory, and an MFU estimate (model FLOPs per sample counted by
   torch.utils.flop_counter on a forward pass, x3 for forward + backward, over the GPU's dense
   bf16/fp16 peak).
3. The largest batch our tiled InfoNCE reaches against open_clip's ClipLoss (forward + backward of
   the loss alone, d = 512, float32 features; the batch doubles until CUDA runs out of memory).
4. model.compile=true: our ViT-B/32 bf16 run compiled, against the same run not compiled.
5. FSDP on one GPU (configs/accelerate/fsdp.yaml, 1 process) with periodic evaluation: the tiny
   recipe for 20 steps, evaluation at 10 and 20, a checkpoint that loads.

Every part runs even when an earlier one failed; the summary lists each with PASS/FAIL and its
figures, and the script exits 1 if any failed. Logs go to --out (default gpu_check_out/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 756, "A100": 312,
               "L40S": 362, "L4": 121, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71}


def log(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[str], out: Path, name: str, timeout: int, env: dict | None = None) -> tuple[int, str]:
    """Run `cmd`, its output into out/NAME.log; (exit code, output). A timeout is exit code 124."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = 124, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout} s"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    (out / f"{name}.log").write_text(text)
    log(f"{name}: exit {code} in {time.perf_counter() - started:.0f} s (log {out / (name + '.log')})")
    return code, text


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return float(value)
    return None


def flops_per_sample(model_config: Path) -> float:
    """Training FLOPs of one image-text pair: forward FLOPs of both towers (counted) x 3."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.models import build_model, load_model_config

    cfg = load_model_config(str(model_config))
    model = build_model(cfg, mlm=False, ar=False).cuda().eval()
    size = cfg["vision_cfg"]["image_size"]
    ids = torch.randint(0, 49000, (2, cfg["text_cfg"]["context_length"]), device="cuda")
    eot = torch.full((2,), cfg["text_cfg"]["context_length"] - 1, device="cuda")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.randn(2, 3, size, size, device="cuda"))
        model.encode_text(ids, eot)
    return 3 * counter.get_total_flops() / 2


# -- the parts -------------------------------------------------------------------------------------
def part_tests(args, out: Path) -> dict:
    code, text = run([PY, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
                     out, "tests", timeout=240)
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    skipped = "skipped" in summary and "passed" not in summary
    return {"ok": code == 0 and not skipped, "figures": summary}


def part_training(args, out: Path, shards: Path) -> dict:
    model = ROOT / "mmpretrain/models/model_configs/ViT-B-32.json"
    figures, ok = [], True
    per_sample = flops_per_sample(model)
    peak = peak_tflops(args.gpu_name, args.peak_tflops)
    for precision in ("bf16", "fp16"):
        cmd = [PY, "pipelines/bench/peer_open_clip.py", "--device", "cuda", "--precision", precision,
               "--model-config", str(model), "--shards", str(shards.parent),
               "--batch-size", str(args.batch_size), "--workers", "6", "--threads", "4", "--steps", "40",
               "--skip", "10", "--tail", "3", "--repeat", "1", "--ours-extra", "data.shuffle_buffer=2000"]
        code, text = run(cmd, out, f"train-{precision}", timeout=300)
        rates = dict(re.findall(r"^\s+(peer|ours \(text off\)|ours \(text on\))\s+([\d.]+) samples/s", text, re.M))
        mems = dict(re.findall(r"^\s+(peer|ours \(text off\)|ours \(text on\))\s+[\d.]+ samples/s, peak GPU (\d+) MiB",
                               text, re.M))
        ok &= code in (0, 1) and bool(rates)  # 1: ours below the CPU target ratio, still a result
        for job, rate in rates.items():
            mfu = f", MFU {100 * float(rate) * per_sample / (peak * 1e12):.1f}%" if peak else ""
            figures.append(f"{precision} {job}: {float(rate):.0f} samples/s, {mems.get(job, '?')} MiB{mfu}")
    figures.append(f"model FLOPs {per_sample / 1e9:.1f} GFLOP per pair (fwd+bwd); peak "
                   f"{peak or 'unknown (pass --peak-tflops)'} TFLOP/s for {args.gpu_name}")
    return {"ok": ok, "figures": "; ".join(figures)}


LOSS_WORKER = """
import sys, torch, torch.nn.functional as F
method, batch = sys.argv[1], int(sys.argv[2])
img = F.normalize(torch.randn(batch, 512, device="cuda"), dim=1).requires_grad_()
txt = F.normalize(torch.randn(batch, 512, device="cuda"), dim=1).requires_grad_()
scale = torch.tensor(100.0, device="cuda", requires_grad=True)
torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
start = torch.cuda.Event(enable_timing=True); end = torch.cuda.Event(enable_timing=True)
start.record()
if method == "ClipLoss":
    from open_clip.loss import ClipLoss
    loss = ClipLoss()(img, txt, scale)
else:
    from mmpretrain.losses.contrastive import clip_loss
    loss = clip_loss(img, txt, scale, tile_size=1024)["loss"]
loss.backward()
end.record(); torch.cuda.synchronize()
print("RESULT", (torch.cuda.max_memory_allocated() - base) / 2**30, start.elapsed_time(end) / 1e3)
"""


def part_loss_batch(args, out: Path) -> dict:
    """Doubling B from 8192 per method, each size in its own process, until out of memory (or 2^20)."""
    found = {}
    for method in ("ClipLoss", "tiled"):
        best, batch = None, 8192
        while batch <= 2**20:
            code, text = run([PY, "-c", LOSS_WORKER, method, str(batch)], out, f"loss-{method}-{batch}", timeout=120)
            hit = re.search(r"RESULT ([\d.]+) ([\d.]+)", text)
            if code != 0 or not hit:
                break
            best = (batch, float(hit.group(1)), float(hit.group(2)))
            batch *= 2
        found[method] = best
    ok = all(found.values()) and found["tiled"][0] >= found["ClipLoss"][0]
    figures = "; ".join(f"{m}: largest B {b[0]} ({b[1]:.1f} GiB extra, {b[2]:.2f} s fwd+bwd)" if b else f"{m}: none"
                        for m, b in found.items())
    return {"ok": ok, "figures": figures}


def _our_run(out: Path, name: str, shards: Path, extra: list[str], timeout: int) -> tuple[int, float | None]:
    run_dir = out / name
    cmd = [PY, "-m", "mmpretrain.train", "--config", "configs/train/my-data.yaml", f"data.train_shards=['{shards}']",
           "data.batch_size=256", "data.num_workers=6", "train.steps=60", "train.checkpoint_every=0",
           "train.precision=bf16", f"train.output_dir={run_dir}", "logging.trackers=[]", "logging.progress=false",
           "model.mlm=false", "model.ar=false", *extra]
    code, _ = run(cmd, out, name, timeout=timeout)
    metrics = run_dir / "metrics.jsonl"
    if code != 0 or not metrics.exists():
        return code, None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["time"] for r in rows if r["kind"] == "train"][20:]  # after compilation and warm-up
    return code, 256 * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else None


def part_compile(args, out: Path, shards: Path) -> dict:
    plain = _our_run(out, "compile-off", shards, [], timeout=240)
    compiled = _our_run(out, "compile-on", shards, ["model.compile=true"], timeout=300)
    ok = plain[0] == 0 and compiled[0] == 0 and plain[1] and compiled[1]
    figures = (f"ViT-B/32 bf16 batch 256: {compiled[1]:.0f} samples/s compiled vs {plain[1]:.0f} not "
               f"({compiled[1] / plain[1]:.2f}x)" if ok else f"exit codes {plain[0]} / {compiled[0]}")
    return {"ok": bool(ok), "figures": figures}


def part_fsdp(args, out: Path, shards: Path) -> dict:
    run_dir = out / "fsdp-run"
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
           "--num_processes", "1", "-m", "mmpretrain.train", "--config", "configs/train/tiny.yaml",
           f"data.train_shards=['{shards}']", "data.text_shards=[]", f"eval.retrieval_shards=['{shards}']",
           "eval.zeroshot_shards=[]", "eval.text_shards=[]", "eval.every=10", "eval.max_samples=512",
           "train.steps=20", "train.checkpoint_every=10", f"train.output_dir={run_dir}", "logging.trackers=[]",
           "logging.progress=false"]
    code, text = run(cmd, out, "fsdp", timeout=240)
    evals = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [(r["step"], r.get("retrieval/text_to_image_R@1")) for r in rows if r["kind"] == "eval"]
    loads = code == 0 and run([PY, "-c", f"from mmpretrain.checkpoint.load import load_model; "
                                         f"print(load_model('{run_dir}').step)"], out, "fsdp-load", 120)[0] == 0
    ok = code == 0 and [s for s, _ in evals] == [10, 20] and loads
    return {"ok": ok, "figures": f"eval rows {evals}; checkpoint loads: {loads}"}


def synthetic_shards(args, out: Path) -> Path:
    """224 px demo images (shapes on backgrounds), prepared once for the training, compile and FSDP parts."""
    folder = out / "shards"
    if not (folder / "train" / "sizes.json").exists():
        raw = out / "raw"
        run([PY, "-m", "mmpretrain", "demo-data", "--out", str(raw), "--num-images", str(args.images),
             "--image-size", "224", "--num-documents", "10"], out, "demo-data", timeout=240)
        run([PY, "-m", "mmpretrain", "prepare", str(raw / "folder"), "--out", str(folder), "--image-size", "224",
             "--shard-size", "500", "--workers", "8", "--no-progress"], out, "prepare", timeout=240)
    return folder / "train"


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "gpu_check_out")
    p.add_argument("--images", type=int, default=4000, help="synthetic 224 px images for the training parts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU (default: by its name)")
    p.add_argument("--only", nargs="+", choices=("tests", "training", "loss", "compile", "fsdp"))
    args = p.parse_args()
    args.gpu_name = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"{args.gpu_name}, torch {torch.__version__}, CUDA {torch.version.cuda}; logs in {args.out}")
    wanted = args.only or ("tests", "training", "loss", "compile", "fsdp")
    results = {}
    shards = synthetic_shards(args, args.out) if {"training", "compile", "fsdp"} & set(wanted) else None
    parts = {"tests": lambda: part_tests(args, args.out), "training": lambda: part_training(args, args.out, shards),
             "loss": lambda: part_loss_batch(args, args.out), "compile": lambda: part_compile(args, args.out, shards),
             "fsdp": lambda: part_fsdp(args, args.out, shards)}
    for name in wanted:
        try:
            results[name] = parts[name]()
        except Exception as exc:  # one broken part must not hide the others' figures
            results[name] = {"ok": False, "figures": f"{type(exc).__name__}: {exc}"}
        log(f"{name}: {'PASS' if results[name]['ok'] else 'FAIL'}: {results[name]['figures']}")
    print(f"\nsummary ({args.gpu_name}, {time.perf_counter() - started:.0f} s):")
    for name, result in results.items():
        print(f"  {name:<9} {'PASS' if result['ok'] else 'FAIL'}  {result['figures']}")
    (args.out / "summary.json").write_text(json.dumps({"gpu": args.gpu_name, **results}, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
