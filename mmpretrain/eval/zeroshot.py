"""Zero-shot classification from embeddings: class embeddings from prompt templates, then metrics.

Per class, the prompt embeddings (one per template) are normalised, averaged and re-normalised
(CLIP's prompt ensembling). An image is predicted as its best-scoring class; ties go to the lower
class index, the same rule as retrieval (see retrieval.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain import storage
from mmpretrain.errors import UserError
from mmpretrain.eval.retrieval import (
    EvalInputError,
    check_embeddings,
    check_indices,
    positive_ranks,
    top_k,
)
from mmpretrain.eval.templates import (
    CLASSNAME_SETS,
    DEFAULT_TEMPLATES,
    TEMPLATE_SETS,
    builtin_classnames,
    builtin_templates,
    fill,
    has_slot,
)
from mmpretrain.shards.layout import (
    BENCHMARK_CLASSNAMES,
    BENCHMARK_TEMPLATES,
    DATASET,
    read_classnames,
    read_lines,
)
from mmpretrain.shards.resolve import dataset_root

EncodeText = Callable[[list[str]], Tensor]  # texts -> (len(texts), d) embeddings


def _check_templates(templates: Sequence[str], where: str = "templates") -> None:
    if not templates:
        raise EvalInputError(f"zeroshot: {where} is empty; give at least one prompt template with {{}}")
    for i, template in enumerate(templates):
        if not has_slot(template):
            raise EvalInputError(f"zeroshot: {where} entry {i} {template!r} has no {{}} or {{c}} for the class name")


def class_embeddings(encode_text: EncodeText, classnames: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 256) -> Tensor:
    """(C, d) unit-norm class embeddings: the mean of each class's normalised prompt embeddings.

    Prompts are ``templates.fill(template, name)`` for every class and template, encoded in batches of
    `batch_size` with `encode_text` (no gradient).
    """
    if not classnames:
        raise EvalInputError("zeroshot: no class names; give at least one")
    _check_templates(templates)
    prompts = [fill(t, name) for name in classnames for t in templates]  # class-major
    parts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            emb = encode_text(batch)
            if not isinstance(emb, Tensor) or emb.dim() != 2 or len(emb) != len(batch):
                shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
                raise ValueError(f"encode_text returned {shape} for {len(batch)} texts; expected (n, d)")
            parts.append(F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=-1))
    per_prompt = torch.cat(parts).view(len(classnames), len(templates), -1)  # (C, T, d)
    return F.normalize(per_prompt.mean(1), dim=-1)  # (C, d)


def classification_metrics(image_emb: Tensor, class_emb: Tensor, labels, *, chunk_size: int = 1024,
                           num_confusions: int = 10) -> dict:
    """Top-1/top-5 accuracy, mean per-class recall and the most frequent confusions.

    image_emb (N, d), class_emb (C, d), labels (N,) ints in [0, C). Keys: ``acc1``, ``acc5`` (only when
    C >= 5), ``mean_per_class_recall`` (mean over classes that have samples, as CLIP_benchmark),
    ``per_class_recall`` (C floats, None for a class without samples), ``per_class_count``,
    ``confusions`` (up to `num_confusions` dicts ``{true, predicted, count}``, most frequent first),
    ``num_samples``, ``num_classes``.
    """
    image_emb, class_emb = check_embeddings("zeroshot", "image_emb", image_emb, "class_emb", class_emb)
    n, num_classes = len(image_emb), len(class_emb)
    labels = check_indices("zeroshot", "labels", labels, n, "image_emb", num_classes, "classes")
    samples = torch.arange(n)
    ranks = positive_ranks(image_emb, class_emb, samples, labels, chunk_size=chunk_size)  # (N,)
    predicted = top_k(image_emb, class_emb, 1, chunk_size=chunk_size)[:, 0]  # (N,)
    count = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[predicted == labels], minlength=num_classes)
    present = count > 0
    recall = correct.double() / count.clamp(min=1)
    out = {"acc1": (ranks <= 1).double().mean().item()}
    if num_classes >= 5:
        out["acc5"] = (ranks <= 5).double().mean().item()
    out.update(
        mean_per_class_recall=recall[present].mean().item(),
        per_class_recall=[r if p else None for r, p in zip(recall.tolist(), present.tolist())],
        per_class_count=count.tolist(),
        confusions=_top_confusions(labels, predicted, num_classes, num_confusions),
        num_samples=n,
        num_classes=num_classes,
    )
    return out


def _top_confusions(labels: Tensor, predicted: Tensor, num_classes: int, limit: int) -> list[dict]:
    """Most frequent (true -> predicted) mistakes; equal counts in (true, predicted) order."""
    wrong = labels != predicted
    # One code per pair, counted with unique: a C x C confusion matrix would not fit for C ~ 20k classes.
    pairs, counts = torch.unique(labels[wrong] * num_classes + predicted[wrong], return_counts=True)
    order = torch.argsort(-counts, stable=True)[:limit]  # unique sorts pairs, stable keeps that order on ties
    return [{"true": int(p) // num_classes, "predicted": int(p) % num_classes, "count": int(c)}
            for p, c in zip(pairs[order].tolist(), counts[order].tolist())]


# -- files -----------------------------------------------------------------------------------------
def load_classnames(path: str | Path) -> list[str]:
    """layout.read_classnames, its errors as EvalInputError (a ValueError for library callers)."""
    try:
        return read_classnames(path)
    except UserError as e:
        raise EvalInputError(str(e)) from None


def _read_lines(path: str | Path, what: str) -> list[str]:
    try:
        return read_lines(path, what)
    except UserError as e:
        raise EvalInputError(str(e)) from None


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with ``{}`` or ``{c}`` for the class name; blank lines skipped."""
    templates = []
    for number, line in enumerate(_read_lines(path, "template"), 1):
        if not line:
            continue
        if not has_slot(line):
            raise EvalInputError(f"template file {path}: line {number} {line!r} has no {{}} or {{c}} "
                                 f"for the class name")
        templates.append(line)
    if not templates:
        raise EvalInputError(f"template file {path} has no templates; "
                             f"write one per line, e.g. 'a photo of a {{}}.'")
    return templates


class Prompts(NamedTuple):
    classnames: list[str]
    templates: list[str]
    classnames_from: str  # where they came from: a file, a built-in set's name, or the shards' file
    templates_from: str


def zeroshot_prompts(classnames: str | None, templates: str | None, shards: Sequence[str]) -> Prompts:
    """Class names and templates of `eval zeroshot` / the eval section: each a file, a built-in set
    (templates.CLASSNAME_SETS / TEMPLATE_SETS) or None = what the shards' folder holds (dataset.json
    "classes" or CLIP_benchmark's classnames.txt; CLIP_benchmark's templates file, else "default")."""
    if classnames is None:
        names, names_from = classnames_from_shards(shards)
    else:
        names, names_from = _file_or_set(classnames, "--classnames", CLASSNAME_SETS, load_classnames,
                                         builtin_classnames), classnames
        _check_count(names, classnames, shards)
    if templates is None:
        found = [f for f in (storage.join(root, BENCHMARK_TEMPLATES) for root in _roots(shards)) if storage.isfile(f)]
        prompts, prompts_from = (load_templates(found[0]), found[0]) if found else (list(DEFAULT_TEMPLATES), "default")
    else:
        prompts, prompts_from = _file_or_set(templates, "--templates", TEMPLATE_SETS, load_templates,
                                             builtin_templates), templates
    return Prompts(names, prompts, names_from, prompts_from)


def _check_count(names: list[str], given: str, shards: Sequence[str]) -> None:
    """Labels are indices: names given for shards whose own class list is longer or shorter would
    score every image against the wrong class."""
    try:
        own, where = classnames_from_shards(shards)
    except EvalInputError:  # the shards list no classes: the labels' range is checked when scoring
        return
    if len(own) != len(names):
        raise EvalInputError(f"zeroshot: the shards were prepared with {len(own)} classes ({where}) but "
                             f"--classnames {given} has {len(names)}; labels would not line up: leave "
                             "--classnames out or give names in the shards' label order")


def _file_or_set(value: str, flag: str, sets: tuple[str, ...], load_file, load_set) -> list[str]:
    """An existing file wins over a built-in set of the same name."""
    if storage.isfile(value):
        return load_file(value)
    if value in sets:
        return load_set(value)
    raise EvalInputError(f"{flag} {value}: no such file, and not a built-in set ({', '.join(sets)}); "
                         "give a file with one entry per line or a built-in name")


def _roots(patterns: Sequence[str]) -> list[str]:
    return [root for root in map(dataset_root, patterns) if root is not None]


def classnames_from_shards(patterns: Sequence[str]) -> tuple[list[str], str]:
    """(class names, the file they came from) beside the shards: the "classes" list of the
    `dataset.json` that `prepare` wrote, or CLIP_benchmark's classnames.txt.

    Looked for in each pattern's dataset folder (shards.layout: shards live in NAME/train, NAME/val
    with dataset.json in NAME/); every pattern must agree.
    """
    found: dict[str, list[str]] = {}
    for root in _roots(patterns):
        dataset, names = storage.join(root, DATASET), storage.join(root, BENCHMARK_CLASSNAMES)
        try:
            classes = json.loads(storage.read_text(dataset)).get("classes")
        except (OSError, ValueError, AttributeError, storage.Missing):
            classes = None
        if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
            found[dataset] = classes
        elif storage.isfile(names):
            found[names] = load_classnames(names)
    if not found:
        raise EvalInputError(f"zeroshot: no class names for {', '.join(patterns)}: no dataset.json with "
                             "\"classes\" (or classnames.txt) beside the shards; pass --classnames FILE (one name "
                             "per line, label 0 first) or a built-in set (imagenet1k)")
    lists = list(found.values())
    if any(c != lists[0] for c in lists[1:]):
        raise EvalInputError(f"zeroshot: the shards' class-name files differ ({', '.join(found)}); "
                             "evaluate one dataset at a time or pass --classnames FILE")
    return lists[0], next(iter(found))
