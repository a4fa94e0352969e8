"""Checkpoints of a run: written atomically, the last K kept, restored exactly, never unpickled.

A checkpoint is `RUN/checkpoints/step-NNNNNNNN/` (layout in mmpretrain.checkpoint.layout), JSON and
safetensors only (mmpretrain.checkpoint.parts):

- `model.safetensors`: the bare MultitaskModel state dict (no `module.` / `_orig_mod.`), gathered in
  full under FSDP; what eval and export read.
- `optimizer.safetensors` + `optimizer.json`: AdamW's tensors, and its param groups, non-tensor
  per-parameter state and the map from parameter names to tensor keys. torch's
  `torch.distributed.checkpoint.state_dict` gives and takes this full, name-keyed form for a plain
  module, DDP and FSDP alike.
- `scheduler.json` (LambdaLR's position), `scaler.json` (fp16 only), `rng_R.json` and `loader_R.json`
  per process R (mmpretrain.checkpoint.rng; where the loaders stand in the global sample sequence,
  the same on every process: a resume may have another number of processes or loader workers).
- `checkpoint.json` (mmpretrain.checkpoint.meta), naming the parts.

Everything is written into `.tmp-step-NNNNNNNN/` first; `checkpoint.json` goes in last and the folder
is renamed into place, so a run killed at any moment leaves either the complete checkpoint or none
(the temp folder is cleared by the next save).

Loading reads and checks every part before it changes anything collective: a bad part on any process
becomes the same one-line UserError on all of them (no process is left waiting in a collective).
Checkpoints of format 1 (accelerate's pickled `optimizer.bin`, `random_states_R.pkl`, ...) are not
resumed; their `model.safetensors` still evaluates, exports, and starts a new run via model.pretrained.

DeepSpeed keeps the optimizer state inside its engine in its own pickled format, which is never
loaded here: a checkpoint saved under DeepSpeed holds the full weights and the JSON parts but no
optimizer, and `train.resume` under DeepSpeed is refused (exact resume needs DDP or FSDP; or start a
new run from the weights with model.pretrained).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mmpretrain.checkpoint import rng
from mmpretrain.checkpoint.layout import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    CHECKPOINTS_DIR,
    checkpoint_dirs,
    checkpoint_name,
    classify,
    latest_checkpoint,
    resume_hint,
)
from mmpretrain.checkpoint.meta import CHECKPOINT_VERSION, read_checkpoint_meta
from mmpretrain.checkpoint.optimizer import decode_optimizer, encode_optimizer
from mmpretrain.checkpoint.parts import (
    conform,
    invalid,
    jsonable,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from mmpretrain.data.plan import derive_seed
from mmpretrain.errors import UserError
from mmpretrain.fileio import DiskFull, writing
from mmpretrain.models.weights import mismatch, shapes_of, strip_prefixes

OPTIMIZER_JSON, OPTIMIZER_TENSORS = "optimizer.json", "optimizer.safetensors"
SCHEDULER, SCALER = "scheduler.json", "scaler.json"


def rng_part(rank: int) -> str:
    return f"rng_{rank}.json"


def loader_part(rank: int) -> str:
    return f"loader_{rank}.json"


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: dict[str, Any], loaders: dict[str, Any],
                    keep: int, *, model, optimizer, scheduler) -> Path:
    """Collective: every process calls it. Returns the checkpoint directory.

    A write that fails for want of space (DiskFull) on any process is the same one-line error on all
    of them, after the temp folder is removed: the previous checkpoint stays `latest`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    hint = resume_hint(run_dir)
    main = accelerator.is_main_process

    def prepare_folder():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    _agree(accelerator, tmp, hint, prepare_folder if main else None)
    weights, optim = _shared_state(accelerator, model, optimizer)  # collective
    parts: list[str] = []

    def write_parts():
        if main:
            parts.extend(_write_shared_parts(accelerator, tmp, weights, optim, scheduler))
        rank = accelerator.process_index
        write_json(tmp / rng_part(rank), rng.capture(accelerator.device))
        write_json(tmp / loader_part(rank), {name: loader.state_dict() for name, loader in loaders.items()})

    _agree(accelerator, tmp, hint, write_parts)

    def publish():
        world = accelerator.num_processes
        parts.extend(name for r in range(world) for name in (rng_part(r), loader_part(r)))
        write_json(tmp / CHECKPOINT_META, {**meta, "step": step, "world_size": world,
                                           "parts": [*parts, CHECKPOINT_META]})
        if final.exists():  # the same step saved again after a resume: the new one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    _agree(accelerator, tmp, hint, publish if main else None)
    return final


def _agree(accelerator, tmp: Path, hint: str, work) -> None:
    """Runs `work` (None: nothing on this process), then a collective: if a write failed for want of
    space on any process, every process raises the same one-line error and the temp folder is gone."""
    error = None
    if work is not None:
        try:
            with writing(tmp, hint):
                work()
        except DiskFull as exc:
            error = str(exc)
    error = _first_error(accelerator, error)  # also the barrier between the steps of a save
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(error)


def _shared_state(accelerator, model, optimizer) -> tuple[dict, dict | None]:
    """The full model and optimizer state, on the main process (collective under FSDP/DeepSpeed)."""
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model), None  # collective; see the module docstring
    # collective under FSDP: the full state, on the main process's CPU (on every process of a CPU
    # run: there is nothing to offload to, and FSDP1's offload of CPU tensors hands back a
    # parameter's exp_avg and exp_avg_sq as views of one reused buffer, so the saved exp_avg was
    # exp_avg_sq; measured with torch 2.15 and gloo)
    offload = accelerator.device.type != "cpu"
    return get_state_dict(model, _inner(optimizer),
                          options=StateDictOptions(full_state_dict=True, cpu_offload=offload))


def _write_shared_parts(accelerator, folder: Path, weights: dict, optim: dict | None, scheduler) -> list[str]:
    """Model, optimizer, scheduler and scaler (the main process's to write); the names written."""
    write_tensors(folder / CHECKPOINT_WEIGHTS, strip_prefixes(weights))
    parts = [CHECKPOINT_WEIGHTS]
    if optim is not None:
        structure, tensors = encode_optimizer(optim)
        write_tensors(folder / OPTIMIZER_TENSORS, tensors)
        write_json(folder / OPTIMIZER_JSON, structure)
        parts += [OPTIMIZER_TENSORS, OPTIMIZER_JSON]
    write_json(folder / SCHEDULER, jsonable(scheduler.state_dict()))
    parts.append(SCHEDULER)
    if accelerator.scaler is not None:
        write_json(folder / SCALER, accelerator.scaler.state_dict())
        parts.append(SCALER)
    return parts


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `train.resume` names: None, "latest" (None when the run has none yet), or a path."""
    if resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise UserError(f"{run_dir} already holds checkpoints; pass train.resume=latest to continue that "
                            "run, or choose another train.output_dir")
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    kind = classify(resume)
    if kind == "run":
        return latest_checkpoint(resume)
    if kind == "weights" and Path(resume).suffix.lower() == ".pt":
        return _epoch_file(Path(resume), run_dir)
    if kind != "checkpoint":
        raise UserError(f"train.resume={resume}: not a training checkpoint, run directory or open_clip_train "
                        "epoch_N.pt (exports and weights files start a run through model.pretrained instead)")
    return Path(resume)


def _epoch_file(path: Path, run_dir: Path) -> Path:
    """An open_clip_train epoch_N.pt (continued by mmpretrain.train.open_clip_train), into a run folder
    without checkpoints: rerunning the command that continued it would otherwise start over from the
    file and mix two histories in one folder (checkpoint rotation deletes by step number)."""
    last = latest_checkpoint(run_dir)
    if last is not None:
        raise UserError(f"train.resume={path}: {run_dir} already holds checkpoints (newest {last.name}); continue "
                        "them with train.resume=latest, or choose another train.output_dir to start again from the file")
    return path


def load_checkpoint(accelerator, path: Path, loaders: dict[str, Any], *, model, optimizer,
                    scheduler) -> dict[str, Any]:
    """Collective: restore everything `save_checkpoint` wrote; returns the checkpoint's meta."""
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError(f"train.resume={path} under DeepSpeed: its engine's optimizer state is not restored "
                        "(mmpretrain loads no pickled state); resume exactly with DDP or FSDP, or start a new run "
                        f"from the weights with model.pretrained={path / CHECKPOINT_WEIGHTS}")
    inner = _inner(optimizer)
    live_model, live_optim = _live_state(model, inner)  # collective under FSDP: before anything can fail
    shapes = shapes_of(live_model)
    tuples = [{k for k, v in group.items() if isinstance(v, tuple)} for group in inner.param_groups]
    try:
        meta = _resumable_meta(accelerator, path)
        _restore_local_parts(accelerator, path, loaders, scheduler, meta)
        restore_rng = _rng_restore(accelerator, path, meta)
        weights, optim = {}, {}
        if accelerator.is_main_process:  # the others receive them from it
            weights = _read_weights(path / CHECKPOINT_WEIGHTS, shapes)
            optim = decode_optimizer(read_json(path / OPTIMIZER_JSON), read_tensors(path / OPTIMIZER_TENSORS),
                                     live_optim, path / OPTIMIZER_JSON, path / OPTIMIZER_TENSORS)
        error = None
    except UserError as exc:
        error = str(exc)
    error = _first_error(accelerator, error)
    if error is not None:
        raise UserError(error)

    broadcast = torch.distributed.is_available() and torch.distributed.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=broadcast)
    # two calls: set_state_dict skips the model on a process that passes it no tensors (torch 2.x)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, inner, optim, options=options)
    for group, names in zip(inner.param_groups, tuples):  # torch gives lists back; AdamW's betas are a tuple
        group.update({k: tuple(group[k]) for k in names if isinstance(group[k], list)})
    restore_rng()
    return meta


def _resumable_meta(accelerator, path: Path) -> dict[str, Any]:
    meta = read_checkpoint_meta(path)
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < CHECKPOINT_VERSION:
        raise UserError(f"{path} predates the safe checkpoint format (version {version}: its optimizer, schedule "
                        "and RNG state are pickled, which mmpretrain no longer loads); continue from its weights "
                        f"in a new run with model.pretrained={path / CHECKPOINT_WEIGHTS} and a new "
                        "train.output_dir (the optimizer state and data position start over)")
    if version != CHECKPOINT_VERSION:
        raise invalid(path / CHECKPOINT_META, f"\"version\": {version!r}, this mmpretrain reads {CHECKPOINT_VERSION}")
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("parts"), list):
        raise invalid(path / CHECKPOINT_META, "no integer \"step\" or no \"parts\" list")
    if OPTIMIZER_JSON not in meta["parts"]:
        raise UserError(f"{path} holds no optimizer state (saved under DeepSpeed) and cannot be resumed exactly; "
                        f"start a new run from its weights with model.pretrained={path / CHECKPOINT_WEIGHTS}")
    if not isinstance(meta.get("world_size"), int) or meta["world_size"] < 1:
        raise invalid(path / CHECKPOINT_META, "no positive integer \"world_size\"")
    return meta


def _rng_restore(accelerator, path: Path, meta: dict[str, Any]):
    """This process's generators as saved; a process the checkpoint did not have (a resume on more
    processes) gets fresh ones from (train seed, step, rank). The data order does not depend on it."""
    rank, saved = accelerator.process_index, meta["world_size"]
    if rank < saved:
        return rng.parse(read_json(path / rng_part(rank)), path / rng_part(rank), accelerator.device)
    seed = (meta.get("config") or {}).get("train", {}).get("seed", 0)
    return rng.fresh(derive_seed(seed, "rng", meta["step"], rank))


def _restore_local_parts(accelerator, path: Path, loaders: dict[str, Any], scheduler, meta: dict) -> None:
    """Loaders, scheduler and scaler: this process's objects only, no collective. A loader's position is
    one place in the global sample sequence, the same on every process (mmpretrain.data.plan): every
    process reads process 0's, and the run may have another number of processes or workers."""
    part = path / loader_part(0)
    states = read_json(part)
    if not isinstance(states, dict):
        raise invalid(part, "expected an object of loader positions")
    notes = []
    for name, loader in loaders.items():
        if name not in states:
            raise UserError(f"{path} has no position for the {name} loader; resume with the same data settings")
        notes.append(_load_into(loader, conform(loader.state_dict(), states[name], part, name), part))
    if meta["world_size"] != accelerator.num_processes:
        notes.append(f"the checkpoint was written by {meta['world_size']} processes, this run has "
                     f"{accelerator.num_processes}; the data continues where it stood")
    if accelerator.is_main_process:
        for note in dict.fromkeys(n for n in notes if n):
            print(f"mmpretrain train: resume: {note}", flush=True)
    part = path / SCHEDULER
    _load_into(scheduler, conform(jsonable(scheduler.state_dict()), read_json(part), part), part)
    if accelerator.scaler is not None:
        part = path / SCALER
        _load_into(accelerator.scaler, conform(accelerator.scaler.state_dict(), read_json(part), part), part)


def _load_into(owner, state: dict[str, Any], part: Path):
    try:
        return owner.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise invalid(part, f"{type(exc).__name__}: {exc}") from None


def _read_weights(part: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    weights = read_tensors(part)
    problem = mismatch(weights, shapes)
    if problem:
        raise invalid(part, f"weights do not fit this model: {problem}")
    return weights


def _live_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's state by bare parameter name, not gathered (FSDP's sharded
    tensors know their full size); torch initialises the optimizer's state for it (a zero step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _first_error(accelerator, message: str | None) -> str | None:
    """The message of the lowest process that has one, on every process (plain tensors, no pickle)."""
    if accelerator.num_processes == 1:
        return message
    import torch.distributed as dist

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    owner = torch.tensor([rank if message is not None else world], device=device)
    dist.all_reduce(owner, op=dist.ReduceOp.MIN)
    if int(owner) == world:
        return None
    buffer = torch.zeros(2048, dtype=torch.uint8, device=device)
    if rank == int(owner):
        data = message.encode("utf-8")[:2048]
        buffer[:len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=int(owner))
    return bytes(buffer.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
