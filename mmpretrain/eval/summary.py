"""Terminal tables for evaluation results (the JSON file holds everything; this is the glance)."""

from __future__ import annotations

from typing import Any

from mmpretrain.table import format_table

MAX_CONFUSIONS = 5


def format_result(result: dict[str, Any]) -> str:
    task, metrics = result["task"], result["metrics"]
    model = result["model"]
    step = f", step {model['step']}" if model.get("step") is not None else ""
    head = f"{task} — {model['kind']} {model['path']}{step} on {', '.join(result['shards'])}"
    body = {"retrieval": _retrieval, "zeroshot": _zeroshot, "text": _text}[task](metrics, result)
    lines = [head, body, *(f"note: {n}" for n in result.get("notes", []))]
    skipped = result.get("counts", {}).get("skipped")
    if skipped:
        lines.append("skipped samples: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)


def _retrieval(metrics: dict[str, Any], result: dict[str, Any]) -> str:
    ks = sorted(int(k.rsplit("@", 1)[1]) for k in metrics if k.startswith("text_to_image_R@"))
    rows = []
    for direction, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        rows.append([label, *(100 * metrics[f"{direction}_R@{k}"] for k in ks),
                     metrics[f"{direction}_mean_rank"], metrics[f"{direction}_median_rank"]])
    table = format_table(["direction", *(f"R@{k} %" for k in ks), "mean rank", "median rank"], rows)
    counts = result.get("counts", {})
    return (f"{table}\n{metrics['num_images']} images, {metrics['num_texts']} captions"
            f" ({counts.get('samples', metrics['num_images'])} samples)")


def _zeroshot(metrics: dict[str, Any], result: dict[str, Any]) -> str:
    rows = [["top-1 %", 100 * metrics["acc1"]]]
    if "acc5" in metrics:
        rows.append(["top-5 %", 100 * metrics["acc5"]])
    rows.append(["mean per-class recall %", 100 * metrics["mean_per_class_recall"]])
    lines = [format_table(["metric", "value"], rows),
             f"{metrics['num_samples']} labelled images, {metrics['num_classes']} classes"
             + (f", {metrics['unlabelled']} unlabelled skipped" if metrics.get("unlabelled") else "")]
    confusions = metrics.get("confusions", [])[:MAX_CONFUSIONS]
    if confusions:
        lines.append("most frequent confusions: " + "; ".join(
            f"{c['true_name']} → {c['predicted_name']} ×{c['count']}" for c in confusions))
    return "\n".join(lines)


def _text(metrics: dict[str, Any], result: dict[str, Any]) -> str:
    rows = []
    if "mlm_accuracy" in metrics:
        rows.append(["MLM accuracy %", 100 * metrics["mlm_accuracy"], metrics["mlm_tokens"]])
    if "ar_perplexity" in metrics:
        rows.append(["AR perplexity", metrics["ar_perplexity"], metrics["ar_tokens"]])
    return f"{format_table(['metric', 'value', 'tokens'], rows)}\n{metrics['num_texts']} texts"
