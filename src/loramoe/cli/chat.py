"""``loramoe chat``: an interactive chat with a base model and an adapter."""

from __future__ import annotations

import argparse

from loramoe.cli._model import add_model_args, add_sampling_args, load_model, sampling_kwargs
from loramoe.cli.overrides import int_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (/reset clears the history, /exit quits)")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int_flag, default=256)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.inference.chat import chat_loop

    model, tokenizer = load_model(args)
    chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens, **sampling_kwargs(args))
    return 0
