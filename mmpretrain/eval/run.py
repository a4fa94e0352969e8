"""`mmpretrain eval retrieval|zeroshot|text`: load any form of model, evaluate, write JSON and a report.

Runs alone or under `accelerate launch` (the embedding work is split over the processes; the main
process scores, writes and returns the result; the others return None).
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import mmpretrain
from mmpretrain.config import Precision, choices
from mmpretrain.eval.evaluator import Embeddings, EvalSettings, Evaluator
from mmpretrain.eval.report import render_report, retrieval_examples
from mmpretrain.eval.retrieval import POSITIVES, EvalInputError
from mmpretrain.eval.zeroshot import zeroshot_prompts
from mmpretrain.fileio import writing
from mmpretrain.runtime import make_accelerator
from mmpretrain.shards.format import image_ext
from mmpretrain.shards.reader import iter_tar_samples
from mmpretrain.storage import write_bytes

TASKS = ("retrieval", "zeroshot", "text")


@dataclass
class EvalRequest:
    task: str
    checkpoint: str
    shards: list[str]
    model: str | None = None
    """Architecture of an open_clip weights file (shipped model name, .json, or open_clip name)."""
    out: str | None = None
    """JSON file for the full result."""
    report: str | None = None
    """PNG report: retrieved images per query caption, or per-class accuracy bars."""
    classnames: str | None = None
    """Class-name file or built-in set (imagenet1k); None = beside the shards."""
    templates: str | None = None
    """Template file or built-in set (default, openai, openai-7); None = beside the shards, else default."""
    positives: str = "sample"
    """Retrieval: "sample" (CLIP_benchmark), "image" (equal image hashes merged) or "caption"."""
    precision: str = "fp32"
    seed: int = 0
    """Text task: seeds each text's mask; retrieval report: which captions are shown."""
    report_queries: int = 8
    settings: EvalSettings = field(default_factory=EvalSettings)


def run_eval(req: EvalRequest) -> dict[str, Any] | None:
    from mmpretrain.checkpoint.load import load_model

    _check_request(req)
    started = time.time()
    accelerator = make_accelerator(req.precision)
    loaded = load_model(req.checkpoint, req.model)
    if req.task == "text" and not (loaded.heads.mlm or loaded.heads.ar):
        raise EvalInputError(f"eval text: {req.checkpoint} has no text heads ({_no_heads_reason(loaded.kind)}); "
                             "text metrics need a checkpoint or export trained with model.mlm or model.ar")
    evaluator = Evaluator(loaded.model.to(accelerator.device), loaded.model_config, device=accelerator.device,
                          settings=req.settings, autocast=accelerator.autocast)
    task_settings: dict[str, Any] = {}
    if req.task == "retrieval":
        done = evaluator.retrieval(req.shards, positives=req.positives)
        metrics = done.metrics
        task_settings = {"positives": req.positives}
    elif req.task == "zeroshot":
        prompts = zeroshot_prompts(req.classnames, req.templates, req.shards)
        task_settings = {"classnames": prompts.classnames_from, "templates": prompts.templates_from,
                         "num_templates": len(prompts.templates)}
        done = evaluator.zeroshot(req.shards, prompts.classnames, prompts.templates)
        metrics = _name_classes(done.metrics, prompts.classnames)
    else:
        done = evaluator.text(req.shards, seed=req.seed)
        metrics = done.metrics
    if not accelerator.is_main_process:  # the main process writes the report and the JSON
        return None
    # the report and the JSON are written atomically; a full disk is one line naming the file
    with writing(req.out or req.report or ".", "free space and rerun the same command"):
        if req.task == "retrieval":
            extra = _retrieval_extra(evaluator, metrics, done.embeddings, req)
        elif req.task == "zeroshot":
            extra = _zeroshot_extra(metrics, done.embeddings, req)
        else:
            extra = {"counts": {"texts": metrics["num_texts"]}, "heads": [h for h in ("mlm", "ar") if getattr(loaded.heads, h)]}
        result = {
            "task": req.task,
            "metrics": metrics,
            "model": loaded.describe(),
            "shards": list(req.shards),
            "counts": extra.pop("counts", {}),
            "settings": {"batch_size": req.settings.batch_size, "precision": req.precision, "seed": req.seed,
                         "processes": accelerator.num_processes, "chunk_size": req.settings.chunk_size,
                         "device": str(accelerator.device), **task_settings},
            "notes": loaded.notes,
            "elapsed_s": round(time.time() - started, 2),
            "mmpretrain_version": mmpretrain.__version__,
            **extra,
        }
        if req.out:
            write_json_atomic(req.out, result)
    return result


def _check_request(req: EvalRequest) -> None:
    """Fail before any model or data work on arguments that cannot work."""
    if req.task not in TASKS:
        raise EvalInputError(f"unknown evaluation {req.task!r}; choose one of {', '.join(TASKS)}")
    if req.precision not in choices(Precision):
        raise EvalInputError(f"--precision {req.precision!r}: choose one of {', '.join(choices(Precision))}")
    if req.report and req.task == "text":
        raise EvalInputError("--report draws retrieval examples or per-class accuracy; eval text has none")
    if req.report and not req.report.lower().endswith(".png"):
        raise EvalInputError(f"--report {req.report}: the report is a PNG; give a path ending in .png")
    for flag, path in (("--out", req.out), ("--report", req.report)):
        if path and not Path(path).resolve().parent.is_dir():
            raise EvalInputError(f"{flag} {path}: folder {Path(path).parent} does not exist; create it first")
    if req.task != "zeroshot" and (req.classnames or req.templates):
        raise EvalInputError("--classnames/--templates belong to eval zeroshot")
    if req.positives not in POSITIVES:
        raise EvalInputError(f"--positives {req.positives!r}: choose one of {', '.join(POSITIVES)}")


def _no_heads_reason(kind: str) -> str:
    return ("an open_clip weights file holds the dual tower only" if kind == "open_clip"
            else "it was trained with model.mlm=false and model.ar=false")


def _retrieval_extra(evaluator: Evaluator, metrics: dict[str, Any], emb: Embeddings,
                     req: EvalRequest) -> dict[str, Any]:
    extra: dict[str, Any] = {"counts": {"samples": len(emb.sources), "images": metrics["num_images"],
                                        "distinct_images": len(set(emb.hashes)), "captions": len(emb.captions),
                                        "skipped": emb.skipped}}
    if req.report:
        pos = evaluator.positives(emb, req.positives)
        image_samples = pos.image_rows.tolist()  # image number -> its sample
        count = min(req.report_queries, len(emb.captions))
        queries = torch.randperm(len(emb.captions), generator=torch.Generator().manual_seed(req.seed))[:count]
        examples = retrieval_examples(
            emb.text, emb.image[image_samples], pos.text_to_image, emb.captions,
            lambda i: load_sample_image(*emb.sources[image_samples[i]]), sorted(queries.tolist()),
        )
        render_report(req.report, retrieval_examples=examples, title=_title(req),
                      summary={k: metrics[k] for k in ("text_to_image_R@1", "image_to_text_R@1") if k in metrics})
        extra["report"] = req.report
    return extra


def _zeroshot_extra(metrics: dict[str, Any], emb: Embeddings, req: EvalRequest) -> dict[str, Any]:
    labelled = int((emb.labels >= 0).sum())
    extra: dict[str, Any] = {"counts": {"samples": len(emb.sources), "labelled": labelled,
                                        "unlabelled": len(emb.sources) - labelled, "skipped": emb.skipped}}
    if req.report:
        bars = {c["class"]: c["recall"] for c in metrics["per_class"]}
        render_report(req.report, class_accuracy=bars, title=_title(req),
                      summary={k: metrics[k] for k in ("acc1", "acc5", "mean_per_class_recall") if k in metrics})
        extra["report"] = req.report
    return extra


def _title(req: EvalRequest) -> str:
    return f"{req.task}: {req.checkpoint} on {', '.join(req.shards)}"


def load_sample_image(url: str, index: int) -> Image.Image:
    """Sample `index` of shard `url`, decoded (only the report's few retrieved images are read again)."""
    for sample in iter_tar_samples(url, index, index + 1):
        ext = image_ext(sample)
        if ext is not None:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image.convert("RGB")
    raise EvalInputError(f"shard {url}: sample {index} has no image any more; was the shard rewritten?")


def _name_classes(metrics: dict[str, Any], classnames: list[str]) -> dict[str, Any]:
    """Per-class lists keyed by class name; confusions with names."""
    out = dict(metrics)
    out["per_class"] = [{"class": name, "recall": recall, "count": count}
                        for name, recall, count in zip(classnames, out.pop("per_class_recall"),
                                                       out.pop("per_class_count"))]
    out["confusions"] = [{**c, "true_name": classnames[c["true"]], "predicted_name": classnames[c["predicted"]]}
                         for c in out["confusions"]]
    return out


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)
