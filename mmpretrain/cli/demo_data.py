"""`mmpretrain demo-data`: draw the procedural demo collection and text corpus."""

from __future__ import annotations

import json
from pathlib import Path

from mmpretrain.cli.types import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("demo-data", help="draw the procedural demo image-caption collection and text corpus")
    p.add_argument("--out", required=True, help="folder to write (folder/, manifest.csv, corpus.txt, classes.txt)")
    p.add_argument("--num-images", type=positive_int, default=4000)
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--num-documents", type=positive_int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=["rich", "binding"], default="rich",
                   help="rich: shape, colour, size, position, count and background all vary (38,880 scenes); "
                        "binding: one large shape on white, shape x colour x position (720 scenes; the quickstart's)")
    p.set_defaults(func=_run_demo_data)


def _run_demo_data(args) -> int:
    from mmpretrain.prepare.demo import generate_demo_data

    summary = generate_demo_data(
        Path(args.out), num_images=args.num_images, image_size=args.image_size,
        seed=args.seed, num_documents=args.num_documents, task=args.task,
    )
    print(json.dumps(summary, indent=2))
    return 0
