"""Where the code runs: the one Accelerator factory (device, precision), CPU thread sizing, and the
plain (non-differentiable) collectives every stage shares. Differentiable gathers live with the
losses (mmpretrain.losses.collectives).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpretrain.config import Precision, choices
from mmpretrain.errors import UserError

# Our precision names -> accelerate's mixed_precision values.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
assert tuple(MIXED_PRECISION) == choices(Precision)


def accelerator_available() -> bool:
    """True when torch sees any accelerator (CUDA, ROCm, MPS, XPU, ...). Only without one does
    accelerate get `cpu=True` — which is also what makes `accelerate launch --multi_gpu` on a CPU
    machine give gloo processes instead of N processes that each think they are alone."""
    return torch.accelerator.is_available()


def make_accelerator(precision: str = "fp32", *, log_with: list[str] | None = None,
                     project_dir: str | Path | None = None):
    """The Accelerator for training and evaluation alike."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs: dict[str, Any] = {}
    if project_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(project_dir),
                                                        logging_dir=str(Path(project_dir) / "logs"))
    try:
        accelerator = Accelerator(cpu=not accelerator_available(), mixed_precision=MIXED_PRECISION[precision],
                                  log_with=log_with or None, **kwargs)
    except RuntimeError as exc:  # accelerate's FSDP plugin refuses CPU-only machines with a traceback
        if accelerator_available() or "FSDP" not in str(exc):
            raise
        raise UserError(f"this launch asks for FSDP, which needs a GPU or another accelerator (accelerate: "
                        f"{str(exc).strip().splitlines()[0]}); on CPU launch with "
                        "--config_file configs/accelerate/cpu-2proc.yaml") from None
    _say_if_fsdp_is_off(accelerator)
    return accelerator


def _say_if_fsdp_is_off(accelerator) -> None:
    """accelerate (1.16, AcceleratorState) turns a launch's FSDP request into FSDP only from a GPU-like
    distributed type (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...); a CPU launch is MULTI_CPU, and there the
    request is dropped without a word. Say it: the run is DDP, same numbers, nothing sharded."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        print(f"mmpretrain: FSDP was asked for, but accelerate runs FSDP on GPUs and other accelerators only; this "
              f"run is {accelerator.distributed_type.value}: every process holds all weights, and the updates are "
              "FSDP's up to float rounding", file=sys.stderr)


def share_cpu_cores(processes: int, workers: int) -> None:
    """On CPU, leave the loader workers their cores: torch's threads spin-wait at every barrier, so one
    thread preempted by a worker stalls the others (measured on 2 cores: 3.8 s median steps with 2
    threads and a busy worker, 1.5 s with 1 thread; pipelines/bench/train_throughput.py). An explicit
    OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // processes - workers))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """On glibc, keep freed blocks of up to `limit` bytes in the process instead of handing them back to
    the OS. glibc serves every block over its mmap threshold (at most 32 MB by default) with a fresh
    mmap and unmaps it on free, so a tensor of that size allocated every step (the (vocab, width)
    gradient of the tied embedding: 50 MB at width 256) faults in every page again: 62 ms against
    36 ms to compute and scale one such gradient on this project's 2-core CPU machine. Values and
    results are unchanged; the process keeps up to `limit` of freed memory. What CUDA's caching
    allocator does on a GPU. Returns whether both settings took (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


# ---------------------------------------------------------------------------- collectives
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """First-dim sizes of every rank's tensor, in rank order (one small collective)."""
    _, world = rank_and_world()
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks, without gradient; at world 1 the same values (`x.detach()`)."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_processes(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Every process's scalars averaged, in one collective (every process must pass the same keys)."""
    keys = sorted(values)
    vector = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(vector)
        vector /= world
    return dict(zip(keys, vector.tolist()))


def end_process_group() -> None:
    """Leave the process group, if one was joined. Run at exit by every process that imported this
    module (the CLI, the Trainer, any script of yours using them): a gloo process that exits with its
    group alive can die in gloo's threads ("terminate called without an active exception", SIGABRT)
    after its work is done, which its launcher reports as a failed run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(end_process_group)


def broadcast_from_main(obj: Any) -> Any:
    """The main process's `obj` on every process (pickled by torch.distributed in memory, never from disk)."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order (pickled by torch.distributed in memory, never from disk)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts
