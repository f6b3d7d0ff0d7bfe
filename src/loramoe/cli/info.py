"""``loramoe info``: adapt a base model and print what was adapted (the smallest real job)."""

from __future__ import annotations

import argparse

from loramoe.cli.overrides import int_flag


def register(sub: argparse._SubParsersAction) -> None:
    from loramoe.models.bundled import DEFAULT_MODEL

    p = sub.add_parser("info", help="adapt a base model and print the adapted layers and parameter counts")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num-experts", type=int_flag, default=8)
    p.add_argument("--rank", type=int_flag, default=4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.config import LoRAMoEConfig
    from loramoe.inject import inject, summary
    from loramoe.models.base import load_base

    model, _ = load_base(args.model)
    inject(model, LoRAMoEConfig(num_experts=args.num_experts, rank=args.rank))
    print(summary(model))
    return 0
