"""The files of a training checkpoint, written and read as JSON and safetensors only: nothing in a
checkpoint is ever unpickled, so a run folder shared between people and machines cannot run code.

Every reader checks what it reads. A file that is not valid JSON / safetensors, or whose content does
not have the structure its writer gives it, is a one-line UserError naming the file (`invalid`).
`conform` is that structure check for the JSON parts: the live object's own `state_dict()` is the
template, so the check follows torch's and the loaders' formats without copying them here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmpretrain.errors import UserError
from mmpretrain.fileio import writing
from mmpretrain.storage import write_bytes


def invalid(path: str | os.PathLike, reason: object) -> UserError:
    reason = " ".join(str(reason).split())[:300]  # one line, whatever the parser said
    return UserError(f"{path}: not a valid checkpoint part ({reason}); use another checkpoint")


def missing(path: str | os.PathLike) -> UserError:
    return UserError(f"{path}: missing; the checkpoint is incomplete, use another checkpoint")


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, json.dumps(value) + "\n")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise missing(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid(path, f"not JSON: {exc}") from None
    except OSError as exc:
        raise invalid(path, exc) from None


def write_tensors(path: Path, tensors: dict) -> None:
    """One safetensors file, on disk (fsync) before checkpoint.json names it. It is written inside the
    checkpoint's temp folder, whose rename makes the whole checkpoint appear at once."""
    from safetensors.torch import save_file

    seen: dict[tuple[int, int], str] = {}
    for key, tensor in tensors.items():  # the same memory under two names is a gather gone wrong, not data
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and where in seen:
            raise RuntimeError(f"{path}: {key} and {seen[where]} are the same memory")
        seen[where] = key
    with writing(path):  # safetensors reports a full disk as its own error type
        save_file({k: _own_memory(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(path, 0o644)  # safetensors creates 0600; run folders are read by other people


def _own_memory(tensor):
    """`tensor`, copied out when it is a view into a larger buffer: FSDP1 gathers a parameter's
    exp_avg and exp_avg_sq into one, and safetensors refuses tensors that share memory."""
    if not tensor.is_contiguous():
        return tensor.contiguous()  # a copy
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def read_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise missing(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise invalid(path, f"not safetensors: {exc}") from None


def jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a state dict that JSON can hold (LambdaLR's keeps its lambdas out already; a
    callable object's attributes may not be plain data)."""
    out = {}
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def conform(template: Any, value: Any, path: Path, where: str = "") -> Any:
    """`value` (read from JSON) checked against `template` (the live object's state): dicts have the
    template's keys (extra ones are dropped), lists its length, numbers stay numbers, and tuples come
    back as tuples (JSON has only lists; AdamW's `betas` must be a tuple again). None on either side
    is accepted as it is (an optional setting)."""
    here = where or "top level"
    if template is None or value is None:
        return value
    if isinstance(template, bool) or isinstance(value, bool):
        if type(template) is not type(value):
            raise invalid(path, f"{here}: expected {type(template).__name__}, found {type(value).__name__}")
        return value
    if isinstance(template, int) and not isinstance(template, bool):
        if not isinstance(value, int):
            raise invalid(path, f"{here}: expected an integer, found {type(value).__name__}")
        return value
    if isinstance(template, float):
        if not isinstance(value, (int, float)):
            raise invalid(path, f"{here}: expected a number, found {type(value).__name__}")
        return float(value)
    if isinstance(template, str):
        if not isinstance(value, str):
            raise invalid(path, f"{here}: expected a string, found {type(value).__name__}")
        return value
    if isinstance(template, (list, tuple)):
        if not isinstance(value, list) or len(value) != len(template):
            raise invalid(path, f"{here}: expected a list of {len(template)}, found {_describe(value)}")
        items = [conform(t, v, path, f"{where}[{i}]") for i, (t, v) in enumerate(zip(template, value))]
        return tuple(items) if isinstance(template, tuple) else items
    if isinstance(template, dict):
        if not isinstance(value, dict):
            raise invalid(path, f"{here}: expected an object, found {_describe(value)}")
        if not template or not all(isinstance(k, str) for k in template):
            return value  # e.g. {worker: count}: JSON keys are strings; the owner converts them
        absent = [k for k in template if k not in value]
        if absent:
            raise invalid(path, f"{here}: no {absent[0]!r}")
        return {k: conform(t, value[k], path, f"{where}.{k}" if where else k) for k, t in template.items()}
    return value  # a type JSON cannot hold was filtered out by `jsonable` when the part was written


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__
