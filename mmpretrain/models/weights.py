"""Load open_clip weights from a local file into the dual tower.

Accepts what people have on disk: open_clip release files (`open_clip_model.safetensors`,
`open_clip_pytorch_model.bin`), open_clip_train checkpoints (`{"state_dict": ...}` with `module.`
prefixes), `torch.compile`d models (`_orig_mod.`), and our own checkpoints (`tower.` prefix; heads are
ignored here). Differences that have one right answer are fixed and reported: a 49408-row token
embedding gains rows for `<mask>`/`<sep>` (`with_vocab_rows`: the mean embedding, which keeps the new
tokens' logits ordinary under the tied decoders), positional embeddings are resized to the model's
image grid / context length. Anything else is a mismatch listed in a one-line error.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mmpretrain.errors import UserError
from mmpretrain.models.model_config import STOCK_VOCAB_SIZE, TEXT_VOCAB_SIZE

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / accelerate, torch.compile
_PREFIXES = (*WRAPPER_PREFIXES, "tower.")  # and our checkpoints' dual tower
_SHOW = 6  # keys listed per kind of mismatch in the error line


@dataclass
class LoadReport:
    path: str
    extended_vocab: tuple[int, int] | None = None
    """(rows in the file, rows in the model) when the token embedding was extended."""
    kept_from_model: list[str] = field(default_factory=list)
    """Model parameters the file does not have and that keep their initial value (logit_bias)."""
    ignored: list[str] = field(default_factory=list)
    """Keys of the file that belong to heads, not to the tower."""


def _refusal(exc: Exception) -> str:
    """The line of torch's weights-only refusal that says what it refused (its message is a page)."""
    named = re.search(r"Unsupported [^.\n]*", str(exc))
    return named[0] if named else "not a tensor pickle"


def load_open_clip_weights(tower: nn.Module, path: str | Path) -> LoadReport:
    """Load `path` into `tower` (open_clip CLIP) in place; raises UserError on any real mismatch."""
    from open_clip.factory import load_state_dict  # imported here: open_clip takes ~25 s to import

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            state = load_state_dict(str(path))  # .pt: torch.load(weights_only=True), which runs no code
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler: garbage, or a pickle holding code
        raise UserError(f"weights {path}: cannot read safely ({_refusal(exc)}); mmpretrain loads tensors only "
                        "and runs no code from files: save the state dict as .safetensors") from None
    except StopIteration:  # open_clip looks at the first key of the state dict
        raise UserError(f"weights {path}: holds no weights (an empty state dict); give a model's weights file") from None
    except Exception as exc:  # torch/safetensors raise many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"weights {path}: cannot read ({type(exc).__name__}: {first})") from None
    return load_tower_state(tower, state, path)


def load_tower_state(tower: nn.Module, state: dict[str, Tensor], where: str | Path) -> LoadReport:
    """`state` (an open_clip state dict already in memory, wrapper prefixes allowed) into `tower`, with
    the fixes and checks of load_open_clip_weights; `where` names it in errors."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    report = LoadReport(str(where))
    state = _tower_keys(state, report)
    model_state = tower.state_dict()
    _extend_vocab(state, model_state, report)
    if "logit_bias" in model_state and "logit_bias" not in state:
        state["logit_bias"] = model_state["logit_bias"]  # CLIP weights into a SigLIP run: keep its init
        report.kept_from_model.append("logit_bias")
    # open_clip's resizers assert on a width change; that is a mismatch for `mismatch` to report.
    if _same_width(state, model_state, "visual.positional_embedding"):
        resize_pos_embed(state, tower)
    if _same_width(state, model_state, "positional_embedding"):
        resize_text_pos_embed(state, tower)
    problem = mismatch(state, shapes_of(model_state))
    if problem:
        raise UserError(f"weights {where} do not fit this model config: {problem}; "
                        "use the model config the weights were trained with")
    tower.load_state_dict(state, strict=True)
    return report


def _same_width(state: dict[str, Tensor], model_state: dict[str, Tensor], key: str) -> bool:
    return key in state and key in model_state and state[key].shape[-1] == model_state[key].shape[-1]


def strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Tensor]:
    """Keys with any run of `prefixes` removed from their front (`module._orig_mod.x` -> `x`)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _tower_keys(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """The dual tower's entries of a file that may also hold our text heads (listed in the report)."""
    out = {}
    for key, value in strip_prefixes(state, _PREFIXES).items():
        if key.split(".", 1)[0] in ("mlm_head", "ar_head", "pair_head"):
            report.ignored.append(key)
            continue
        out[key] = value
    return out


def _extend_vocab(state: dict[str, Tensor], model_state: dict[str, Tensor], report: LoadReport) -> None:
    """Every vocabulary-shaped tensor of a stock file (the token embedding; in files of ours the MLM
    bias too) gains the model's rows for <mask>/<sep>."""
    for key, value in state.items():
        if key in model_state and is_vocab_extension(tuple(value.shape), tuple(model_state[key].shape)):
            state[key] = with_vocab_rows(value, fill="mean")
            report.extended_vocab = (value.shape[0], model_state[key].shape[0])


def is_vocab_extension(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A tensor of the stock CLIP vocabulary (49408 rows) where the model has ours (49410 rows)."""
    return len(have) >= 1 and have[0] == STOCK_VOCAB_SIZE and tuple(want) == (TEXT_VOCAB_SIZE, *have[1:])


def with_vocab_rows(value: Tensor, *, fill: str) -> Tensor:
    """`value` (49408, ...) with the rows of <mask> and <sep> appended: (49410, ...).

    fill="mean" (weights): the mean row, deterministic, and under the tied decoders it gives the new
    tokens the average logit of every context, so they are neither favoured nor ruled out before they
    are trained (a zero or random row would be one or the other). fill="zeros" (optimizer moments):
    no gradient seen yet, which is what AdamW's state of a new parameter is.
    """
    rows = TEXT_VOCAB_SIZE - value.shape[0]
    if fill == "mean":
        extra = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(rows, *value.shape[1:])
    elif fill == "zeros":
        extra = value.new_zeros((rows, *value.shape[1:]))
    else:
        raise ValueError(f"fill = {fill!r}: must be 'mean' or 'zeros'")
    return torch.cat([value, extra], dim=0)  # (V, ...)


def mismatch(state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps `state` from fitting a model whose parameters have `shapes` (missing, unexpected and
    wrongly shaped keys, a few of each named), or None when it fits exactly."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(state) & set(shapes) if tuple(state[k].shape) != tuple(shapes[k]))
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({_listing(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({_listing(unexpected)})")
    if wrong:
        shown = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k])}" for k in wrong[:_SHOW]]
        parts.append(f"shape mismatch {len(wrong)} ({', '.join(shown)}{', ...' if len(wrong) > _SHOW else ''})")
    return "; ".join(parts)


def shapes_of(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
