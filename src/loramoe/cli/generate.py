"""``loramoe generate``: answers to prompts (flags or a file) from a base model and an adapter."""

from __future__ import annotations

import argparse
import json

from loramoe.cli._model import add_model_args, add_sampling_args, load_model, sampling_kwargs
from loramoe.cli.overrides import int_flag
from loramoe.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate answers with a base model and an adapter")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="prompts: .txt (one per line) or .jsonl/.json")
    p.add_argument("--max-new-tokens", type=int_flag, default=128)
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int_flag, default=8)
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.inference.generate import generate

    prompts = _read_prompts(args)
    model, tokenizer = load_model(args)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        **sampling_kwargs(args),
    )
    for prompt, output in zip(prompts, outputs):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "output": output}, ensure_ascii=False))
        else:
            print(f">>> {prompt}\n{output}\n")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from loramoe.inference.prompts import read_prompts

    prompts = list(args.prompt or [])
    if args.file:
        prompts += read_prompts(args.file)
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --file PROMPTS.txt/.jsonl")
    return prompts
