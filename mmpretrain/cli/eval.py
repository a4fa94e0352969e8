"""`mmpretrain eval retrieval|zeroshot|text`."""

from __future__ import annotations

import json

from mmpretrain.cli.types import positive_int
from mmpretrain.config.schema import Positives, Precision, choices

EVAL_HELP = {
    "retrieval": "image<->text retrieval R@1/5/10, mean/median rank (several captions per image)",
    "zeroshot": "zero-shot classification: top-1/top-5, mean per-class recall (labels from KEY.cls)",
    "text": "MLM accuracy on masked tokens and AR perplexity on text shards",
}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run, checkpoint, export or open_clip model on shards "
                                    "(also under `accelerate launch -m mmpretrain eval ...`)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, help_text in EVAL_HELP.items():
        t = tasks.add_parser(task, help=help_text)
        t.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                       help="run directory (its newest checkpoint), checkpoint directory, exported directory, "
                            "or open_clip weights file (with --model)")
        t.add_argument("--model", help="architecture of an open_clip weights file: shipped model name, .json, "
                                       "or open_clip model name")
        t.add_argument("--shards", required=True, nargs="+", metavar="PATTERN",
                       help="shard folder, tar, or brace/glob pattern (several allowed)")
        t.add_argument("--out", help="write the full result (metrics, settings, counts) as JSON here")
        t.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
        if task != "text":
            t.add_argument("--report", help="write a PNG report here (retrieved images / per-class accuracy)")
        if task == "retrieval":
            t.add_argument("--report-queries", type=positive_int, default=8, help="captions shown in the report")
            t.add_argument("--positives", choices=choices(Positives), default="sample",
                           help="which captions hit which images: sample = each sample is its own image "
                                "(CLIP_benchmark, open_clip_train); image = samples with equal image hash are one "
                                "image; caption = also every image with exactly the same caption text")
        if task == "zeroshot":
            t.add_argument("--classnames", metavar="FILE_OR_SET",
                           help="class names, one per line, label 0 first, or a built-in set: imagenet1k "
                                "(default: the shards' dataset.json or CLIP_benchmark classnames.txt)")
            t.add_argument("--templates", metavar="FILE_OR_SET",
                           help="prompt templates, one per line with {} or {c}, or a built-in set: default "
                                "(ours, 12), openai (CLIP's 80 ImageNet prompts), openai-7 (default: CLIP_benchmark's "
                                "zeroshot_classification_templates.txt beside the shards, else default)")
        t.add_argument("--batch-size", type=positive_int, default=256, help="per process")
        t.add_argument("--workers", type=int, default=2, help="data-loading workers per process")
        t.add_argument("--precision", choices=choices(Precision), default="fp32")
        t.add_argument("--chunk-size", type=positive_int, default=1024, help="query rows scored at a time")
        t.add_argument("--seed", type=int, default=0, help="masking seed (text), report captions (retrieval)")
        t.add_argument("--no-progress", action="store_true")
        t.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from mmpretrain.eval.evaluator import EvalSettings
    from mmpretrain.eval.run import EvalRequest, run_eval
    from mmpretrain.eval.summary import format_result

    request = EvalRequest(
        task=args.task, checkpoint=args.checkpoint, shards=args.shards, model=args.model, out=args.out,
        report=getattr(args, "report", None), classnames=getattr(args, "classnames", None),
        templates=getattr(args, "templates", None), positives=getattr(args, "positives", "sample"),
        precision=args.precision, seed=args.seed,
        report_queries=getattr(args, "report_queries", 8),
        settings=EvalSettings(batch_size=args.batch_size, num_workers=max(0, args.workers),
                              chunk_size=args.chunk_size, progress=not args.no_progress),
    )
    result = run_eval(request)
    if result is not None:  # the main process prints; the others took their share of the work
        print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0
