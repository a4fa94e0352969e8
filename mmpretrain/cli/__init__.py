"""The `mmpretrain` command: parse, call, print. User mistakes end in one line and exit code 2.

One module per verb (`mmpretrain/cli/VERB.py`, with `add_parser(sub)`); building the parser imports no
torch, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mmpretrain.errors import UserError

VERBS = ("demo_data", "prepare", "inspect", "train", "eval", "export", "plot")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process has the same complaint
            print(f"mmpretrain {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `mmpretrain ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        print(f"mmpretrain {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        importlib.import_module(f"mmpretrain.cli.{verb}").add_parser(sub)
    return parser
