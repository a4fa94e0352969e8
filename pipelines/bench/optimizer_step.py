"""The AdamW update alone, on CPU: torch's default implementation vs foreach vs fused (what `optim.fused` picks).

The trainer's optimizer is `build_optimizer` (open_clip's weight-decay groups, the config's lr, betas
and eps). torch chooses foreach only for CUDA tensors and never fused by itself, so on CPU the default
is a loop running about ten small kernels per parameter tensor; open_clip_train uses that default.
This script builds the model (--model), gives every parameter a random gradient, and times
`optimizer.step()` for each implementation, alternating them --repeat times in one process (the same
threads, the same memory state), --steps steps per turn. It also checks that after those steps every
implementation holds the same weights as the default one (max |difference| <= --atol).

    make bench-optim
    .venv/bin/python pipelines/bench/optimizer_step.py --model ViT-B-32 --threads 2

Exit 1 when fused is not faster than the default or the weights differ.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from mmpretrain.config import OptimConfig, load_config
from mmpretrain.models import build_model, load_model_config
from mmpretrain.table import format_table
from mmpretrain.train.optim import param_groups

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_optimizer(model: torch.nn.Module, o: OptimConfig, kind: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             **IMPLEMENTATIONS[kind])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mmpretrain/models/model_configs/tiny.json", help="a shipped model name (mmpretrain/models/model_configs) or JSON, or an open_clip name")
    p.add_argument("--config", default="configs/train/tiny.yaml", help="where lr, weight decay, betas and eps come from")
    p.add_argument("--text-heads", action="store_true", help="build the MLM and AR heads too (default: the dual tower)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the peer benchmark's default is 1)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per turn")
    p.add_argument("--repeat", type=int, default=5, help="turns per implementation, alternating")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed weight difference from the default")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    o = load_config(args.config, [f"model.name={args.model}"]).optim
    torch.manual_seed(0)
    base = build_model(load_model_config(args.model), mlm=args.text_heads, ar=args.text_heads)
    models = {kind: copy.deepcopy(base) for kind in IMPLEMENTATIONS}
    optimizers = {kind: make_optimizer(m, o, kind) for kind, m in models.items()}
    params = list(base.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(t.shape, generator=gen) * 1e-2 for t in params]
    for kind, m in models.items():
        for t, g in zip(m.parameters(), grads):
            t.grad = g.clone()
        optimizers[kind].step()  # warm-up: state tensors allocated, kernels loaded

    times: dict[str, list[float]] = {kind: [] for kind in IMPLEMENTATIONS}
    for r in range(args.repeat):
        order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
        for kind in order:
            for _ in range(args.steps):
                start = time.perf_counter()
                optimizers[kind].step()
                times[kind].append(time.perf_counter() - start)

    reference = dict(models["default"].named_parameters())
    diffs = {kind: max((t - reference[n]).abs().max().item() for n, t in m.named_parameters())
             for kind, m in models.items()}
    med = {kind: statistics.median(ts) for kind, ts in times.items()}
    print(f"model {args.model}: {sum(t.numel() for t in params):,} parameters in {len(params)} tensors; "
          f"{args.threads} thread(s); {args.repeat} x {args.steps} steps each, alternating; "
          f"{1 + args.repeat * args.steps} steps in all per implementation\n")
    rows = [[kind, f"{1e3 * med[kind]:.2f}", f"{1e3 * min(times[kind]):.2f}", f"{med[kind] / med['default']:.3f}",
             f"{diffs[kind]:.1e}"] for kind in IMPLEMENTATIONS]
    print(format_table(["AdamW", "median ms", "min ms", "vs default", "max |w - default w|"], rows))
    ok = med["fused"] < med["default"] and all(d <= args.atol for d in diffs.values())
    print(f"\nfused / default: {med['fused'] / med['default']:.3f} ({med['default'] / med['fused']:.1f}x faster)   "
          f"{'PASS' if ok else 'FAIL'} (fused faster, weights within {args.atol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
