"""Evaluation on embeddings: retrieval, zero-shot classification, text metrics, the report PNG.

Everything here takes embeddings (or per-batch sums) and returns plain dicts; extracting embeddings
from a checkpoint is the caller's job, so these functions never import the model.
"""

from mmpretrain.eval.report import RetrievalExample, render_report, retrieval_examples
from mmpretrain.eval.retrieval import (
    CaptionGroups,
    EvalInputError,
    group_captions,
    positive_ranks,
    rank_summary,
    retrieval_metrics,
    retrieval_ranks,
    top_k,
)
from mmpretrain.eval.templates import DEFAULT_TEMPLATES
from mmpretrain.eval.text_metrics import TextMetrics, ar_counts, mlm_counts
from mmpretrain.eval.zeroshot import class_embeddings, classification_metrics, load_classnames, load_templates

__all__ = [
    "DEFAULT_TEMPLATES",
    "CaptionGroups",
    "EvalInputError",
    "RetrievalExample",
    "TextMetrics",
    "ar_counts",
    "class_embeddings",
    "classification_metrics",
    "group_captions",
    "load_classnames",
    "load_templates",
    "mlm_counts",
    "positive_ranks",
    "rank_summary",
    "render_report",
    "retrieval_examples",
    "retrieval_metrics",
    "retrieval_ranks",
    "top_k",
]
