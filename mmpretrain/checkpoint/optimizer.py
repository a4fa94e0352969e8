"""`optimizer.safetensors` + `optimizer.json`: a full, name-keyed optimizer state dict (the form
`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(full_state_dict=True)` gives)
split into its tensors and the rest.

optimizer.json: {"param_groups": [{..., "params": [parameter name, ...]}, ...],
                 "state": {parameter name: {"tensors": {"exp_avg": tensor key, ...}, "values": {...}}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpretrain.checkpoint.parts import conform, invalid


def encode_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for name, values in state_dict["state"].items():
        entry: dict[str, dict[str, Any]] = {"tensors": {}, "values": {}}
        for field, value in values.items():
            if torch.is_tensor(value):
                key = f"{name}/{field}"
                tensors[key] = value
                entry["tensors"][field] = key
            else:
                entry["values"][field] = value
        state[name] = entry
    return {"param_groups": state_dict["param_groups"], "state": state}, tensors


def decode_optimizer(structure: Any, tensors: dict[str, torch.Tensor], live: dict[str, Any], json_part: Path,
                     tensor_part: Path) -> dict[str, Any]:
    """The state dict `encode_optimizer` split, checked against `live` (the same form of the optimizer
    being restored, its state initialised: every parameter's fields and full sizes), so that torch's
    loader meets no surprise half-way through a collective."""
    if not isinstance(structure, dict) or not isinstance(structure.get("param_groups"), list) \
            or not isinstance(structure.get("state"), dict):
        raise invalid(json_part, "expected an object with \"param_groups\" and \"state\"")
    groups, live_groups = structure["param_groups"], live["param_groups"]
    if len(groups) != len(live_groups):
        raise invalid(json_part, f"{len(groups)} parameter groups, this optimizer has {len(live_groups)}")
    out_groups = []
    for i, (group, live_group) in enumerate(zip(groups, live_groups)):
        template = {k: v for k, v in live_group.items() if k != "params"}
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or sorted(map(str, params)) != sorted(live_group["params"]):
            raise invalid(json_part, f"param_groups[{i}].params: not the parameters of this model's group {i}")
        out_groups.append({**conform(template, group, json_part, f"param_groups[{i}]"), "params": live_group["params"]})
    state = structure["state"]
    unknown = sorted(set(state) - set(live["state"]))  # fewer is fine: a parameter that never had a gradient
    if unknown:
        raise invalid(json_part, f"state of {unknown[0]!r}, not a parameter of this optimizer")
    return {"param_groups": out_groups,
            "state": {name: _decode_entry(name, entry, live["state"][name], tensors, json_part, tensor_part)
                      for name, entry in state.items()}}


def _decode_entry(name: str, entry: Any, live: dict[str, Any], tensors: dict[str, torch.Tensor], json_part: Path,
                  tensor_part: Path) -> dict[str, Any]:
    """One parameter's state: the fields the live one has, tensors where it has tensors, of its sizes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict) \
            or not isinstance(entry.get("values"), dict):
        raise invalid(json_part, f"state of {name}: expected \"tensors\" and \"values\" objects")
    fields = {**entry["values"], **entry["tensors"]}
    if sorted(fields) != sorted(live) or sorted(entry["tensors"]) != sorted(k for k, v in live.items()
                                                                         if torch.is_tensor(v)):
        raise invalid(json_part, f"state of {name}: fields {sorted(fields)}, this optimizer keeps {sorted(live)}")
    out = {k: conform(live[k], v, json_part, f"state.{name}.{k}") for k, v in entry["values"].items()}
    for field, key in entry["tensors"].items():
        if not isinstance(key, str) or key not in tensors:
            raise invalid(tensor_part, f"no tensor {key!r} (state {field!r} of {name})")
        if tuple(tensors[key].size()) != tuple(live[field].size()):
            raise invalid(tensor_part, f"{key}: size {tuple(tensors[key].size())}, this optimizer's is "
                                       f"{tuple(live[field].size())}")
        out[field] = tensors[key]
    return out
