"""``loramoe serve``: an OpenAI-compatible HTTP server for a base model, an adapter or a training output."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loramoe.cli._model import add_model_args, load_model
from loramoe.cli.overrides import int_flag
from loramoe.config import field_docs
from loramoe.errors import ConfigError
from loramoe.serve.config import API_KEY_ENV, ServeConfig

_TYPES = {"int": int_flag, "float": float}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (chat and completions, batched)",
        description="Serve a model over an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C. Prefer "
        f"${API_KEY_ENV} to --api-key: a command line is visible to every user of the machine.",
    )
    add_model_args(p)
    docs = field_docs(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_TYPES.get(str(f.type), str),
            default=f.default,
            help=docs[f.name],
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    if not values["model_name"]:
        values["model_name"] = Path(args.adapter or args.model or "").name
    try:  # every setting, and the address, checked before the slow model load
        config = ServeConfig(**values)
        sock = config.bind()
    except ConfigError as err:
        field, _, rest = str(err).partition(" ")
        raise ConfigError(f"--{field.replace('_', '-')} {rest}" if field in values else str(err)) from None
    with sock:
        missing = [m for m in ("starlette", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'loramoe[serve]'")
        from loramoe.serve.server import serve

        model, tokenizer = load_model(args)
        serve(model, tokenizer, config, sock=sock)
    return 0
