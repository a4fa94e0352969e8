"""`mmpretrain plot RUN`: a run's training curves as a PNG."""

from __future__ import annotations

from mmpretrain.train.plot import DEFAULT_OUT


def add_parser(sub) -> None:
    """Add `mmpretrain plot RUN [--out PNG]` to the subparsers `sub` of the mmpretrain parser."""
    p = sub.add_parser("plot", help="draw a run's training curves (losses, lr, eval metrics, throughput) as a PNG")
    p.add_argument("run", metavar="RUN", help="run directory (train.output_dir) holding metrics.jsonl")
    p.add_argument("--out", metavar="PNG", help=f"image to write (default: RUN/{DEFAULT_OUT})")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from mmpretrain.train.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0
