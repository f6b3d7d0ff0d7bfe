"""``loramoe eval``: evaluate a base model or an adapter on the knowledge and downstream suites."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loramoe.cli.overrides import int_flag
from loramoe.files import load_yaml


def register(sub: argparse._SubParsersAction) -> None:
    from loramoe.config import field_docs
    from loramoe.eval.evaluate import EvalConfig

    docs = field_docs(EvalConfig)
    p = sub.add_parser(
        "eval", help="evaluate a base model or an adapter on the knowledge and downstream suites"
    )
    p.add_argument("config", nargs="?", help="YAML file of eval settings (flags override it)")
    for name in (
        "model",
        "adapter",
        "tasks",
        "data_dir",
        "output_dir",
        "label",
        "device",
        "dtype",
        "experts_off",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=docs[name])
    for name in ("limit", "batch_size", "max_new_tokens", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int_flag, default=None, help=docs[name])
    p.add_argument(
        "--chat-template",
        dest="chat_template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=docs["chat_template"],
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.eval.evaluate import EvalConfig, evaluate_benchmarks
    from loramoe.eval.report import RESULTS_JSON, results_markdown

    raw = load_yaml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    raw |= {k: v for k, v in vars(args).items() if k in names and v is not None}
    result = evaluate_benchmarks(EvalConfig.from_dict(raw))
    print(results_markdown(result))
    print(f"written to {Path(result['config']['output_dir']) / RESULTS_JSON}")
    return 0
