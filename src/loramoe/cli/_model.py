"""What the inference subcommands (generate, chat) share: the model and sampling flags, and loading from them."""

from __future__ import annotations

import argparse
from typing import Any

from loramoe.cli.overrides import int_flag


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
    add_quantization_arg(p)
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle-format weights (pytorch_model.bin, adapter_model.bin) of a model or PEFT adapter whose "
        "origin you trust, with torch.load(weights_only=True); refused by default (docs/reliability.md)",
    )


def add_quantization_arg(p: argparse.ArgumentParser) -> None:
    from loramoe.models.quantization import QUANTIZATIONS

    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="load the base with 4-bit NF4 (computing in --dtype) or 8-bit LLM.int8 linears through bitsandbytes "
        "(pip install 'loramoe[quant]'); an adapter trained on a float or a quantized base loads onto either",
    )


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from loramoe.models.trained import load_trained

    return load_trained(
        args.adapter,
        base=args.model,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        quantization=args.quantization,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The decoding flags; a setting left out comes from the model's generation config (``inference.sampling``)."""
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's "
                   "generation config, else 1)")  # fmt: skip
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus mass (default: generation config, else 1)"
    )
    p.add_argument(
        "--top-k", type=int_flag, default=None, help="keep the k likeliest tokens (default: config, else all)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (greedy too)"
    )
    p.add_argument("--stop", action="append", default=[], help="a string that ends an answer (repeatable)")
    p.add_argument("--seed", type=int_flag, default=None, help="seed of each answer's sampler")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": tuple(args.stop),
        "seed": args.seed,
    }
