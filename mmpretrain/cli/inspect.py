"""`mmpretrain inspect`: validate and summarise shards, optionally draw a contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

from mmpretrain.cli.types import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise and validate shards; optionally draw a contact sheet")
    p.add_argument("target", metavar="DIR_OR_PATTERN", help="prepare output folder, tar, or brace/glob pattern")
    p.add_argument("--grid", type=Path, help="write a contact-sheet PNG of samples with their captions")
    p.add_argument("--grid-samples", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from mmpretrain.shards.inspect import inspect_shards

    report = inspect_shards(args.target, grid=args.grid, grid_samples=args.grid_samples)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0 if report.ok else 1
