"""The `mmpretrain` command: parse, call, print. User mistakes end in one line and exit code 2.

One module per verb (`mmpretrain/cli/VERB.py`, with `add_parser(sub)`); building the parser imports no
torch, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import copy
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help (argparse's), except where there is nothing to show: no
    default (None), a flag (False), or a help text that already says it; descriptions and epilogs
    keep their line breaks (tables, key lists)."""

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        return action.default not in (None, False, argparse.SUPPRESS) and bool(action.option_strings)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._has_default(action) else action.help

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._has_default(action):  # argparse prints no help line at all otherwise
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Every verb's parser (and its sub-parsers, e.g. `eval TASK`) formats help with HelpFormatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for verb in VERBS:
        importlib.import_module(f"mmpretrain.cli.{verb}").add_parser(sub)
    return parser
