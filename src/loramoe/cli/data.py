"""``loramoe data``: download the public data sets the project names (evaluation and example training data) into the
``datasets`` cache, checked against their pinned SHA-256, and lay them out as a data directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="download the pinned public data sets into the datasets cache and lay them out as a data directory",
        description="Each set is a pinned URL with a SHA-256 (src/loramoe/eval/tasks/sources.json). The files go "
        "into the datasets cache; the data directory links to them. Point --data-dir or $LORAMOE_DATA_DIR at it.",
    )
    p.add_argument("folders", nargs="*", help="data set folders (default: every one; --list shows them)")
    p.add_argument(
        "--out", default=None, help="the data directory to lay out (default: inside the datasets cache)"
    )
    p.add_argument(
        "--list", action="store_true", help="list the data sets, their sources and licenses, and exit"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.errors import ConfigError
    from loramoe.eval.tasks import sources

    known = sources.sources()
    if args.list:
        for folder, entry in known.items():
            size = sum(f.get("bytes", 0) for f in entry["files"].values())
            print(f"{folder:22} {len(entry['files']):3} file(s) {size / 1e6:6.1f} MB  {entry['repository']}")
            print(f"{'':22} license: {entry['license']}")
        return 0
    unknown = [f for f in args.folders if f not in known]
    if unknown:
        raise ConfigError(f"unknown data set(s) {unknown}; known: {', '.join(known)}")
    root = sources.fetch(args.folders or list(known), args.out)
    print(f"data directory: {root}  (use --data-dir {root} or export LORAMOE_DATA_DIR={root})")
    return 0
