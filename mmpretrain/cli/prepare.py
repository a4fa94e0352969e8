"""`mmpretrain prepare`: image-caption collections or text corpora -> WebDataset shards."""

from __future__ import annotations

import os

from mmpretrain.cli.types import fraction, positive_int
from mmpretrain.errors import UserError


def add_parser(sub) -> None:
    from mmpretrain.prepare.images import DEFAULT_MAX_PIXELS, ENCODE_FORMATS, RESIZE_MODES
    from mmpretrain.prepare.sources import KINDS

    p = sub.add_parser("prepare", help="turn image-caption collections or text corpora into WebDataset shards")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folder (IMAGE + same-stem .txt), class-folder tree, CSV/TSV/JSONL/Parquet manifest, "
                        "tar shards (path, directory, brace pattern), or text files with --text-only")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/NAME, or a storage URL (s3://bucket/NAME, "
                                                "any fsspec URL; credentials from the standard places, e.g. AWS_*)")
    p.add_argument("--name", help="shard file prefix (default: the output folder's name)")
    p.add_argument("--format", choices=KINDS, help="source kind, when detection from the path is not enough")
    g = p.add_argument_group("manifest columns")
    g.add_argument("--image-column", help="image path or URL column (default: image|url|path|filepath|file)")
    g.add_argument("--caption-column", help="caption column (default: caption|text|title)")
    g.add_argument("--label-column", help="label column of integers or class names (names are numbered in sorted "
                                          "order, or as --classnames lists them; default: 'label' when present)")
    g.add_argument("--classnames", metavar="FILE", help="class names, one per line, label 0 first: the numbering "
                                                         "of a label column of names (and of class folders)")
    g.add_argument("--caption-template", default="a photo of a {}.",
                   help="caption for class-folder sources; {} is the class name (default: %(default)r)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=positive_int, default=256)
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop")
    g.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
    g.add_argument("--min-size", type=int, default=0, help="fail inputs whose short side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, default=0.0, help="fail inputs with long/short above this")
    g.add_argument("--encode-format", choices=sorted(ENCODE_FORMATS), default="jpg")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    g.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help="decompression-bomb limit: larger images fail (default: %(default)s)")
    g = p.add_argument_group("text-only")
    g.add_argument("--text-only", action="store_true", help="sources are text (.txt, .jsonl): write text shards")
    g.add_argument("--text-unit", choices=("line", "paragraph"), default="line",
                   help="a document is one line, or a blank-line separated paragraph")
    g.add_argument("--text-field", default="text", help="JSONL field that holds the document")
    g.add_argument("--max-text-chars", type=positive_int, default=2000, help="split longer documents")
    g = p.add_argument_group("downloads (URLs in the image column)")
    g.add_argument("--threads", type=positive_int, default=16, help="concurrent downloads")
    g.add_argument("--in-flight", type=positive_int, default=None,
                   help="downloads running or finished and waiting for an earlier URL: how far the other URLs "
                        "run ahead of a slow one (memory: about this many images; default: 32 x --threads)")
    g.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per attempt in all: connect, headers and body (default: %(default)s)")
    g.add_argument("--retries", type=int, default=2)
    g.add_argument("--max-bytes", type=positive_int, default=20_000_000)
    g.add_argument("--max-redirects", type=int, default=5)
    g = p.add_argument_group("output")
    g.add_argument("--shard-size", type=positive_int, default=10_000,
                   help="inputs per train shard (it holds fewer: failures, val samples, duplicates); samples per "
                        "val shard. Also the unit of work of parts and engines")
    g.add_argument("--max-shard-bytes", type=int, default=0,
                   help="also cap shard bytes: a train shard over it continues in NAME-{n}_1.tar ... (0: no cap)")
    g.add_argument("--val-fraction", type=fraction, default=0.01,
                   help="share of samples in val/, chosen by content hash")
    g.add_argument("--dedupe", action="store_true", help="drop exact duplicate images (counted)")
    g.add_argument("--follow-symlinks", action="store_true",
                   help="follow links in folder sources that point outside the folder (default: recorded as "
                        "outside_source failures)")
    g = p.add_argument_group("running it (none of these changes the output)")
    g.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="image processes (local engine)")
    g.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--num-parts", type=positive_int, default=1,
                   help="split the work into N parts (whole shards each) to run on N machines against one --out; "
                        "e.g. a Slurm array (pipelines/recipes/prepare-slurm-array.sbatch)")
    g.add_argument("--part", type=int, default=0, help="which part this run does: 0 .. N-1")
    g.add_argument("--finalize", action="store_true",
                   help="only write sizes.json, stats.json, failures.jsonl and dataset.json once all parts are "
                        "done (the last part to finish does this by itself)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this machine; ray: shard-sized tasks on the Ray cluster named by RAY_ADDRESS "
                        "or --ray-address (pip install 'mmpretrain-clip[ray]')")
    g.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from mmpretrain.prepare.fetch import FetchOptions
    from mmpretrain.prepare.images import ImageOptions
    from mmpretrain.prepare.pipeline import PrepareOptions, run_prepare
    from mmpretrain.prepare.sources import ColumnOptions
    from mmpretrain.prepare.text import TextOptions
    from mmpretrain.shards.layout import read_classnames

    if args.classnames and not os.path.isfile(args.classnames):  # say what to do, not just 'not found'
        raise UserError(f"--classnames file {args.classnames} not found (or not a file); give a text file with "
                        "one class name per line, label 0 first")
    if "{}" not in args.caption_template:
        raise UserError(f"--caption-template {args.caption_template!r} has no {{}} for the class name")
    opts = PrepareOptions(
        out=args.out, name=args.name, format=args.format, text_only=args.text_only,
        columns=ColumnOptions(args.image_column, args.caption_column, args.label_column, args.caption_template,
                              tuple(read_classnames(args.classnames)) if args.classnames else ()),
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
        dedupe=args.dedupe, follow_symlinks=args.follow_symlinks, workers=args.workers, threads=args.threads,
        in_flight=args.in_flight or 0, overwrite=args.overwrite,
        progress=not args.no_progress, num_parts=args.num_parts, part=args.part, finalize_only=args.finalize,
        engine=args.engine, ray_address=args.ray_address,
    )
    stats = run_prepare(args.sources, opts)
    if stats is not None:
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
