"""Evaluation on embeddings: retrieval, zero-shot classification, text metrics, the report PNG.

The metric modules (retrieval, zeroshot, text_metrics, report) take embeddings (or per-batch sums)
and return plain dicts; they never see the model. `evaluator.Evaluator` streams shards through a
model on one or many processes and feeds them; `run.run_eval` is the `mmpretrain eval` command.
"""

from mmpretrain.eval.report import RetrievalExample, render_report, retrieval_examples
from mmpretrain.eval.retrieval import (
    CaptionGroups,
    EvalInputError,
    RetrievalPositives,
    caption_pairs,
    group_captions,
    positive_ranks,
    rank_summary,
    retrieval_metrics,
    retrieval_positives,
    retrieval_ranks,
    top_k,
)
from mmpretrain.eval.templates import DEFAULT_TEMPLATES, fill
from mmpretrain.eval.text_metrics import TextMetrics, ar_counts, mlm_counts
from mmpretrain.eval.zeroshot import (
    class_embeddings,
    classification_metrics,
    load_classnames,
    load_templates,
    zeroshot_prompts,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "CaptionGroups",
    "EvalInputError",
    "RetrievalExample",
    "RetrievalPositives",
    "TextMetrics",
    "ar_counts",
    "caption_pairs",
    "class_embeddings",
    "classification_metrics",
    "fill",
    "group_captions",
    "load_classnames",
    "load_templates",
    "mlm_counts",
    "positive_ranks",
    "rank_summary",
    "render_report",
    "retrieval_examples",
    "retrieval_metrics",
    "retrieval_positives",
    "retrieval_ranks",
    "top_k",
    "zeroshot_prompts",
]
