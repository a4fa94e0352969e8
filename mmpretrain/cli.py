"""The `mmpretrain` command: parse, call, print. User mistakes end in one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mmpretrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process has the same complaint
            print(f"mmpretrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mmpretrain ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"mmpretrain {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_data(sub)
    _add_prepare(sub)
    _add_inspect(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    from mmpretrain.train.plot import add_plot_parser

    add_plot_parser(sub)
    return parser


# -- demo-data -----------------------------------------------------------------------------------
def _add_demo_data(sub) -> None:
    p = sub.add_parser("demo-data", help="draw the procedural demo image-caption collection and text corpus")
    p.add_argument("--out", required=True, help="folder to write (folder/, manifest.csv, corpus.txt, classes.txt)")
    p.add_argument("--num-images", type=_positive_int, default=4000)
    p.add_argument("--image-size", type=_positive_int, default=64)
    p.add_argument("--num-documents", type=_positive_int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo_data)


def _run_demo_data(args) -> int:
    from mmpretrain.data.demo import generate_demo_data

    summary = generate_demo_data(
        Path(args.out), num_images=args.num_images, image_size=args.image_size,
        seed=args.seed, num_documents=args.num_documents,
    )
    print(json.dumps(summary, indent=2))
    return 0


# -- prepare -------------------------------------------------------------------------------------
def _add_prepare(sub) -> None:
    from mmpretrain.data.prepare.images import DEFAULT_MAX_PIXELS, ENCODE_FORMATS, RESIZE_MODES
    from mmpretrain.data.prepare.sources import KINDS

    p = sub.add_parser("prepare", help="turn image-caption collections or text corpora into WebDataset shards")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folder (IMAGE + same-stem .txt), class-folder tree, CSV/TSV/JSONL/Parquet manifest, "
                        "tar shards (path, directory, brace pattern), or text files with --text-only")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/NAME")
    p.add_argument("--name", help="shard file prefix (default: the output folder's name)")
    p.add_argument("--format", choices=KINDS, help="source kind, when detection from the path is not enough")
    g = p.add_argument_group("manifest columns")
    g.add_argument("--image-column", help="image path or URL column (default: image|url|path|filepath|file)")
    g.add_argument("--caption-column", help="caption column (default: caption|text|title)")
    g.add_argument("--label-column", help="integer label column (default: 'label' when present)")
    g.add_argument("--caption-template", default="a photo of a {}.",
                   help="caption for class-folder sources; {} is the class name (default: %(default)r)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=_positive_int, default=256)
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop")
    g.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
    g.add_argument("--min-size", type=int, default=0, help="fail inputs whose short side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, default=0.0, help="fail inputs with long/short above this")
    g.add_argument("--encode-format", choices=sorted(ENCODE_FORMATS), default="jpg")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    g.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb limit: larger images fail (default: %(default)s)")
    g = p.add_argument_group("text-only")
    g.add_argument("--text-only", action="store_true", help="sources are text (.txt, .jsonl): write text shards")
    g.add_argument("--text-unit", choices=("line", "paragraph"), default="line",
                   help="a document is one line, or a blank-line separated paragraph")
    g.add_argument("--text-field", default="text", help="JSONL field that holds the document")
    g.add_argument("--max-text-chars", type=_positive_int, default=2000, help="split longer documents")
    g = p.add_argument_group("downloads (URLs in the image column)")
    g.add_argument("--threads", type=_positive_int, default=16, help="concurrent downloads")
    g.add_argument("--timeout", type=float, default=10.0)
    g.add_argument("--retries", type=int, default=2)
    g.add_argument("--max-bytes", type=_positive_int, default=20_000_000)
    g.add_argument("--max-redirects", type=int, default=5)
    g = p.add_argument_group("output")
    g.add_argument("--shard-size", type=_positive_int, default=10_000, help="samples per shard")
    g.add_argument("--max-shard-bytes", type=int, default=0, help="also cap shard bytes (0: no cap)")
    g.add_argument("--val-fraction", type=_fraction, default=0.01,
                   help="share of samples in val/, chosen by content hash")
    g.add_argument("--dedupe", action="store_true", help="drop exact duplicate images (counted)")
    g.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1))
    g.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from mmpretrain.data.prepare.fetch import FetchOptions
    from mmpretrain.data.prepare.images import ImageOptions
    from mmpretrain.data.prepare.pipeline import PrepareOptions, run_prepare
    from mmpretrain.data.prepare.sources import ColumnOptions
    from mmpretrain.data.prepare.text import TextOptions

    if "{}" not in args.caption_template:
        raise UserError(f"--caption-template {args.caption_template!r} has no {{}} for the class name")
    opts = PrepareOptions(
        out=args.out, name=args.name, format=args.format, text_only=args.text_only,
        columns=ColumnOptions(args.image_column, args.caption_column, args.label_column, args.caption_template),
        image=ImageOptions(
            image_size=args.image_size, resize_mode=args.resize_mode,
            resize_only_if_bigger=args.resize_only_if_bigger, min_size=args.min_size,
            max_aspect_ratio=args.max_aspect_ratio, encode_format=args.encode_format,
            quality=args.quality, max_pixels=args.max_pixels,
        ),
        text=TextOptions(unit=args.text_unit, field=args.text_field, max_chars=args.max_text_chars),
        fetch=FetchOptions(timeout=args.timeout, retries=args.retries, max_bytes=args.max_bytes,
                           max_redirects=args.max_redirects),
        shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes, val_fraction=args.val_fraction,
        dedupe=args.dedupe, workers=args.workers, threads=args.threads, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    stats = run_prepare(args.sources, opts)
    print(prepare_summary(stats, args.out))
    return 0


def prepare_summary(stats: dict, out: str) -> str:
    from mmpretrain.table import format_table

    rows = [[s, c["inputs"], c["written"], c["failed"], c["deduplicated"], c["shards"]]
            for s, c in stats["splits"].items()]
    rows.append(["total", stats["inputs"], stats["written"], stats["failed"], stats["deduplicated"],
                 sum(c["shards"] for c in stats["splits"].values())])
    lines = [format_table(["split", "inputs", "written", "failed", "deduplicated", "shards"], rows)]
    if stats["reasons"]:
        lines.append("failures: " + ", ".join(f"{r} {n}" for r, n in stats["reasons"].items())
                     + f"  (details in {out}/failures.jsonl)")
    if stats.get("samples_per_s"):
        lines.append(f"{stats['samples_per_s']} samples/s over {stats['elapsed_s']} s")
    return "\n".join(lines)


# -- inspect -------------------------------------------------------------------------------------
def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise and validate shards; optionally draw a contact sheet")
    p.add_argument("target", metavar="DIR_OR_PATTERN", help="prepare output folder, tar, or brace/glob pattern")
    p.add_argument("--grid", type=Path, help="write a contact-sheet PNG of samples with their captions")
    p.add_argument("--grid-samples", type=_positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from mmpretrain.data.inspect import inspect_shards

    report = inspect_shards(args.target, grid=args.grid, grid_samples=args.grid_samples)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0 if report.ok else 1


# -- train ---------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a config (one process; the same code runs under "
                                     "`accelerate launch -m mmpretrain.train`)")
    p.add_argument("--config", required=True, help="configs/train/NAME.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, values in YAML (train.steps=100 data.train_shards=[a,b])")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from mmpretrain.config import load_config
    from mmpretrain.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    if trainer.accelerator.is_main_process:
        loss = f"loss {metrics['loss']:.4f}, " if metrics else ""
        print(f"trained to step {trainer.step}: {loss}run directory {cfg.train.output_dir} "
              f"(evaluate it with `mmpretrain eval retrieval --checkpoint {cfg.train.output_dir} --shards ...`)")
    return 0


# -- eval ----------------------------------------------------------------------------------------
EVAL_HELP = {
    "retrieval": "image<->text retrieval R@1/5/10, mean/median rank (several captions per image)",
    "zeroshot": "zero-shot classification: top-1/top-5, mean per-class recall (labels from KEY.cls)",
    "text": "MLM accuracy on masked tokens and AR perplexity on text shards",
}


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run, checkpoint, export or open_clip model on shards "
                                    "(also under `accelerate launch -m mmpretrain eval ...`)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, help_text in EVAL_HELP.items():
        t = tasks.add_parser(task, help=help_text)
        t.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                       help="run directory (its newest checkpoint), checkpoint directory, exported directory, "
                            "or open_clip weights file (with --model)")
        t.add_argument("--model", help="architecture of an open_clip weights file: configs/models name, .json, "
                                       "or open_clip model name")
        t.add_argument("--shards", required=True, nargs="+", metavar="PATTERN",
                       help="shard folder, tar, or brace/glob pattern (several allowed)")
        t.add_argument("--out", help="write the full result (metrics, settings, counts) as JSON here")
        t.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
        if task != "text":
            t.add_argument("--report", help="write a PNG report here (retrieved images / per-class accuracy)")
        if task == "retrieval":
            t.add_argument("--report-queries", type=_positive_int, default=8, help="captions shown in the report")
        if task == "zeroshot":
            t.add_argument("--classnames", help="class names, one per line, label 0 first "
                                                "(default: the shards' dataset.json)")
            t.add_argument("--templates", help="prompt templates, one per line with {} (default: built-in set)")
        t.add_argument("--batch-size", type=_positive_int, default=256, help="per process")
        t.add_argument("--workers", type=int, default=2, help="data-loading workers per process")
        t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
        t.add_argument("--chunk-size", type=_positive_int, default=1024, help="query rows scored at a time")
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
        templates=getattr(args, "templates", None), precision=args.precision, seed=args.seed,
        report_queries=getattr(args, "report_queries", 8),
        settings=EvalSettings(batch_size=args.batch_size, num_workers=max(0, args.workers),
                              chunk_size=args.chunk_size, progress=not args.no_progress),
    )
    result = run_eval(request)
    if result is not None:  # the main process prints; the others took their share of the work
        print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


# -- export --------------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run/checkpoint as an open_clip model directory (+ text heads)")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="run directory (its newest checkpoint), checkpoint directory, exported directory, "
                        "or open_clip weights file (with --model)")
    p.add_argument("--model", help="architecture of an open_clip weights file: configs/models name, .json, "
                                   "or open_clip model name")
    p.add_argument("--out", required=True, help="directory to write (open_clip local-dir: layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from mmpretrain.models.export import export_model
    from mmpretrain.models.loading import load_model

    loaded = load_model(args.checkpoint, args.model)
    out = export_model(loaded.model, loaded.model_config, loaded.heads, args.out, overwrite=args.overwrite,
                       provenance={"source": loaded.path, "source_kind": loaded.kind, "step": loaded.step})
    heads = [h for h, on in vars(loaded.heads).items() if on]
    print(f"exported {loaded.kind} {loaded.path} to {out} (heads: {', '.join(heads) or 'none'}); "
          f"load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


# -- argument types ------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
