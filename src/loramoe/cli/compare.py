"""``loramoe compare``: evaluation runs side by side, with knowledge retention against a base run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="put evaluation runs side by side with knowledge retention")
    p.add_argument("results", nargs="+", help="results.json files or their folders; the base run first")
    p.add_argument("--out", required=True, help="folder for compare.md and compare.png")
    p.add_argument(
        "--base", default=None, help="base run by label or index (default: first without an adapter)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the bar chart (no matplotlib needed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.eval.report import compare
    from loramoe.validation import parse_int

    base = args.base
    if base is not None:
        index = parse_int(base, "--base")
        base = index if index is not None and index >= 0 else base
    print(compare(args.results, args.out, base=base, plot=not args.no_plot))
    return 0
