"""``loramoe routing``: heatmaps and expert-group masses of an adapter's routing, per task."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path

from loramoe.cli._model import add_quantization_arg
from loramoe.cli.overrides import int_flag
from loramoe.errors import ConfigError
from loramoe.validation import parse_int, shown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("routing", help="heatmaps and group masses of an adapter's routing per task")
    p.add_argument("--adapter", required=True, help="a LoRAMoE training output / adapter directory")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    p.add_argument(
        "--data", action="append", required=True, metavar="NAME=PATH[:TASK_TYPE]",
        help="a task's examples (JSON/JSONL, any training format); the optional task type overrides the "
        "records' own (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder for routing.json, routing.md and the PNGs")
    p.add_argument("--max-examples", type=int_flag, default=64, help="examples per task (the first ones)")
    p.add_argument("--batch-size", type=int_flag, default=8)
    p.add_argument("--template", default="auto", help="auto, chat or plain (as in training)")
    p.add_argument("--dtype", default="float32")
    add_quantization_arg(p)
    p.add_argument("--no-plot", action="store_true", help="write the JSON and table only (no matplotlib)")
    p.add_argument(
        "--experts-off", default=None, metavar="GROUP|I,J",
        help="switch these experts off (an expert group's task name, or indices) and renormalise the router over "
        "the rest: where does the routing go without them?",
    )  # fmt: skip
    p.set_defaults(func=run)


def parse_data_arg(spec: str, task_names: Sequence[str]) -> tuple[str, str, str | int | None]:
    """``name=path[:task_type]`` -> ``(name, path, task_type or None)``; the suffix counts only if it is a task type."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(
            f"--data {spec!r} must look like name=path[:task_type], e.g. trivia=qa.jsonl:knowledge"
        )
    path, colon, task_type = rest.rpartition(":")
    index = parse_int(task_type, f"--data {shown(spec)}") if colon and path else None
    if colon and path and (task_type in task_names or (index is not None and index >= 0)):
        return name, path, index if index is not None else task_type
    return name, rest, None


def run(args: argparse.Namespace) -> int:
    from loramoe.analysis.report import routing_markdown, routing_report
    from loramoe.data.sources import SourceConfig, load_examples
    from loramoe.inject import adapted_modules, disable_experts, experts_spec, get_config
    from loramoe.models.trained import load_trained

    # "" is a selection of no expert, not "none off": refused (by experts_spec) before the model loads
    experts_off = None if args.experts_off is None else experts_spec(args.experts_off)
    model, tokenizer = load_trained(
        args.adapter, base=args.model, dtype=args.dtype, quantization=args.quantization
    )
    if not adapted_modules(model):
        raise ConfigError(f"{args.adapter}: not a LoRAMoE adapter (no router to analyse)")
    names = get_config(model).task_names
    tasks = {}
    for spec in args.data:
        name, path, task_type = parse_data_arg(spec, names)
        tasks[name] = load_examples(SourceConfig(path=path, name=name, task_type=task_type), names)
    off = disable_experts(model, experts_off) if experts_off is not None else contextlib.nullcontext()
    with off:
        report = routing_report(
            model, tokenizer, tasks, args.out, max_examples=args.max_examples, batch_size=args.batch_size,
            template=args.template, plot=not args.no_plot,
        )  # fmt: skip
    print(routing_markdown(report), end="")
    print(f"written to {args.out}: " + ", ".join(Path(f).name for f in report["files"].values()))
    return 0
