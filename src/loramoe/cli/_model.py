"""What the inference subcommands (generate, chat) share: the model flags and loading from them."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    p.add_argument(
        "--adapter",
        default=None,
        help="a training output / adapter directory (loramoe, PEFT or full), or a Hugging Face Hub repository id "
        "(org/name) of a loramoe or PEFT adapter; an existing directory of that name wins",
    )
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of the --adapter Hub repository (default: main)",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default, CPU), bfloat16, float16 or auto")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle-format weights (pytorch_model.bin, adapter_model.bin) of a model or PEFT adapter whose "
        "origin you trust, with torch.load(weights_only=True); refused by default (docs/reliability.md)",
    )


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from loramoe.models.trained import load_trained

    return load_trained(
        args.adapter,
        base=args.model,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
    )
