"""``loramoe train CONFIG [key=value ...] [--resume]``: fine-tune from a YAML run config."""

from __future__ import annotations

import argparse
import json

from loramoe.cli.overrides import apply_overrides, with_source
from loramoe.files import load_yaml


def register(sub: argparse._SubParsersAction) -> None:
    from loramoe.config import LoRAMoEConfig, field_docs
    from loramoe.models.quantization import QUANTIZATIONS
    from loramoe.training.run_config import LoraBaselineConfig, RunConfig

    sections = [("", RunConfig), ("loramoe.", LoRAMoEConfig), ("lora.", LoraBaselineConfig)]
    keys = "\n".join(
        f"  {prefix}{name}: {doc}" for prefix, cls in sections for name, doc in field_docs(cls).items()
    )
    p = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (YAML, or key=value overrides):\n{keys}\n  data.*: see the README's data section",
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="train on a 4-bit (NF4) or 8-bit base: the same as the override quantization=4bit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.training import train
    from loramoe.training.run_config import RunConfig

    raw = apply_overrides(load_yaml(args.config), args.overrides)
    if args.quantization is not None:
        raw["quantization"] = args.quantization
    config = with_source(args.config, RunConfig.from_dict, raw)
    try:
        metrics = with_source(args.config, lambda r: train.train(r, resume=args.resume), config)
    finally:
        _end_distributed()
    print(json.dumps({k: v for k, v in metrics.items() if k != "data"}, indent=2, default=str))
    print(f"adapter written to {config.training['output_dir']}")
    return 0


def _end_distributed() -> None:
    """Tear down the process group of a torchrun / accelerate launch (exiting without it can crash at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
