"""Continue an open_clip_train run: its `epoch_N.pt` as `train.resume`.

open_clip_train saves {"epoch", "name", "state_dict" (keys maybe "module."-prefixed), "optimizer"
(torch's AdamW state dict, keyed by parameter index), "scaler"?}. Its AdamW holds two groups built in
open_clip_train/main.py from `model.named_parameters()` in order: first every trainable parameter its
`exclude` rule matches (0-/1-D, "bn", "ln", "bias", "logit_scale" in the name; no weight decay), then the
rest. Reproducing that order names each index, so the moments land on our parameter of the same name.

What carries over: the dual tower's weights; AdamW's exp_avg, exp_avg_sq and step for every tower
parameter; the global step (AdamW's per-parameter step: the optimizer steps open_clip_train took,
which the epoch number alone does not give). What does not: the text heads (new, fresh AdamW state),
open_clip_train's learning rate, schedule and weight decay (ours from the config, at that step), its
GradScaler, its data position and RNG (our stream starts from its beginning). The file is read with
torch.load(weights_only=True): nothing in it can run code.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from mmpretrain.errors import UserError
from mmpretrain.models.weights import is_vocab_extension, load_tower_state, strip_prefixes, with_vocab_rows
from mmpretrain.train.optim import no_weight_decay


def is_open_clip_train_checkpoint(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".pt"


def read_checkpoint(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "not a tensors-only file"
        raise UserError(f"train.resume={path}: cannot read safely ({first[:200]}); mmpretrain loads tensors only "
                        "and runs no code from files") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise UserError(f"train.resume={path}: cannot read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"train.resume={path}: not an open_clip_train checkpoint (no \"state_dict\"); start from "
                        f"weights with model.pretrained={path}")
    if not isinstance(ckpt.get("optimizer"), dict) or not ckpt["optimizer"].get("state"):
        raise UserError(f"train.resume={path}: holds no optimizer state (open_clip_train saves it in epoch_N.pt); "
                        f"start from its weights with model.pretrained={path} instead")
    return ckpt


def open_clip_train_groups(tower: torch.nn.Module, saved_names) -> list[list[str]]:
    """Names of `tower`'s trainable parameters that the saved model had (`saved_names`), in
    open_clip_train's two AdamW groups ([no decay, decay]), each in `named_parameters()` order."""
    named = [(n, p) for n, p in tower.named_parameters() if p.requires_grad and n in saved_names]
    return [[n for n, p in named if no_weight_decay(n, p)], [n for n, p in named if not no_weight_decay(n, p)]]


def _names_by_index(path: Path, saved: dict, groups: list[list[str]]) -> dict[int, str]:
    """open_clip_train's optimizer index -> parameter name, group by group; a different split is one line."""
    sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
    if sizes != [len(g) for g in groups]:
        raise UserError(f"train.resume={path}: its AdamW groups hold {'+'.join(map(str, sizes)) or 'no'} parameters, "
                        f"open_clip_train's grouping of this model's tower gives {len(groups[0])}+{len(groups[1])} "
                        "(no decay + decay); continue with the architecture and lock settings that run used (and "
                        "its default --opt adamw), or start from its weights with model.pretrained")
    return {int(i): n for g, names in zip(saved["param_groups"], groups) for i, n in zip(g["params"], names)}


def continue_open_clip_train(path: str | Path, model, optimizer) -> tuple[int, list[str]]:
    """Load weights and AdamW state of `path` into `model` (a bare MultitaskModel) and `optimizer` (its
    torch AdamW); returns (global step, notes for the log). Every process calls it (DDP)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    load_tower_state(model.tower, ckpt["state_dict"], path)  # "module." prefixes, the vocabulary rows
    model.clamp_logit_scale_()
    saved = ckpt["optimizer"]
    # our tower may have parameters theirs had not (a SigLIP logit_bias): those start fresh
    names = _names_by_index(path, saved, open_clip_train_groups(model.tower, set(strip_prefixes(ckpt["state_dict"]))))
    params = dict(model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    steps = set()
    for index, values in saved["state"].items():
        name = names.get(int(index))
        param = params[f"tower.{name}"] if name is not None else None
        if param is None:
            raise UserError(f"train.resume={path}: optimizer state {index} belongs to no parameter of its groups; "
                            "the file is damaged or not open_clip_train's")
        values = _with_vocab_rows(values, param)
        if tuple(values["exp_avg"].shape) != tuple(param.shape):
            raise UserError(f"train.resume={path}: optimizer state {index} has shape {tuple(values['exp_avg'].shape)}, "
                            f"parameter {name} {tuple(param.shape)}; not this architecture's run")
        optimizer.state[param] = _adamw_state(values, param, group_of[id(param)])
        steps.add(int(values["step"]))
    fresh = [n for n, p in params.items() if p.requires_grad and p not in optimizer.state]
    notes = [f"continued open_clip_train {path.name} (epoch {ckpt.get('epoch')}, {max(steps)} optimizer steps): "
             f"weights and AdamW moments of {len(saved['state'])} tower parameters carried over",
             "not carried over: its lr/schedule/weight decay (the config's apply from this step), "
             f"GradScaler{' (present)' if 'scaler' in ckpt else ''}, data position and RNG"]
    if fresh:
        notes.append(f"{len(fresh)} parameters without a counterpart start with fresh AdamW state "
                     f"({', '.join(sorted({n.removeprefix('tower.').split('.')[0] for n in fresh}))})")
    return max(steps), notes


def _with_vocab_rows(values: dict, param: torch.Tensor) -> dict:
    """Moments of a 49408-row tensor (the token embedding) for our 49410 rows: zeros for <mask>/<sep>,
    as AdamW starts any parameter (models.weights.with_vocab_rows; the weights' rows are its mean)."""
    return {k: with_vocab_rows(v, fill="zeros") if torch.is_tensor(v) and is_vocab_extension(
        tuple(v.shape), tuple(param.shape)) else v for k, v in values.items()}


def _adamw_state(values: dict, param: torch.Tensor, group: dict) -> dict:
    """torch AdamW's per-parameter state, on the devices and dtypes this optimizer keeps it."""
    on_device = group.get("fused") or group.get("capturable")
    step = torch.tensor(float(values["step"]), dtype=torch.float32, device=param.device if on_device else "cpu")
    out = {"step": step, "exp_avg": values["exp_avg"].to(param.device, param.dtype).clone(),
           "exp_avg_sq": values["exp_avg_sq"].to(param.device, param.dtype).clone()}
    if group.get("amsgrad") and "max_exp_avg_sq" in values:
        out["max_exp_avg_sq"] = values["max_exp_avg_sq"].to(param.device, param.dtype).clone()
    return out
