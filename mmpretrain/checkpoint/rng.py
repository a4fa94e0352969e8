"""`rng_R.json`: the random generators of process R (python, numpy, torch CPU, and the accelerator's
when the run has one) as plain integers, so an exact resume draws the same dropout masks without a
pickled `random_states_R.pkl` (the loaders seed their own draws: mmpretrain.data.stream). A resume
on more processes seeds the new ones' generators afresh (`fresh`).

The accelerator's state is the one of this process's device only (accelerate's saved every visible
GPU, which starts a context on each)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpretrain.checkpoint.parts import invalid


def capture(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    module = _device_module(device)
    if module is not None:
        state[device.type] = module.get_rng_state(device).tolist()
    return state


def parse(state: Any, path: Path, device: torch.device) -> Callable[[], None]:
    """Check `state` (read from `path`) by loading it into scratch generators; returns the function
    that sets this process's generators to it."""
    try:
        version, internal, gauss = state["python"]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)
        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(numpy)
        cpu = torch.tensor(state["torch"], dtype=torch.uint8)
        torch.Generator().set_state(cpu)
        module = _device_module(device)
        on_device = None
        if module is not None and device.type in state:  # absent when the run moved from the CPU
            on_device = torch.tensor(state[device.type], dtype=torch.uint8)
            if on_device.shape != module.get_rng_state(device).shape:
                raise ValueError(f"{device.type} generator state of {on_device.numel()} bytes")
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        raise invalid(path, f"random generator state: {type(exc).__name__}: {exc}") from None

    def restore() -> None:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if on_device is not None:
            module.set_rng_state(on_device, device)

    return restore


def fresh(seed: int) -> Callable[[], None]:
    """For a process the checkpoint has no generators of (a resume on more processes): the function
    that seeds this process's generators from `seed`."""
    def restore() -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # the accelerators' generators too

    return restore


def _device_module(device: torch.device):
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device.type)
    return module if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state") else None
