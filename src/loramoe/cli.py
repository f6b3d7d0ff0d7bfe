"""The ``loramoe`` command line: thin subcommands that parse a config and call one library function each.

Every error loramoe raises on purpose ends in one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramoe.errors import ConfigError, LoRAMoEError, TargetError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason}); save the config as UTF-8") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}{where}: invalid YAML ({problem})") from err
    if data is None:
        raise ConfigError(f"{p}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _yaml_loader():
    """A SafeLoader that also reads ``1e-4`` (no dot, valid YAML 1.2) as a float, as users expect."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$"), list("-+0123456789.")
    )
    return Loader


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML: numbers, booleans, lists)."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. training.learning_rate=1e-4)"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _NUMBER.fullmatch(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        node: Any = config
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # data.sources.0.path: an index into a list
                node = node[_index(item, part, node)]
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {item!r}: item {part} is {node!r}, not a section")
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        if isinstance(node, list):
            node[_index(item, parts[-1], node)] = value
        else:
            node[parts[-1]] = value
    return config


def _index(item: str, part: str, items: list) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(items)} items")
    return int(part)


def _cmd_train(args: argparse.Namespace) -> int:
    from loramoe.train import RunConfig, train

    raw = apply_overrides(load_yaml(args.config), args.overrides)
    run = _with_source(args.config, RunConfig.from_dict, raw)
    try:
        metrics = _with_source(args.config, lambda r: train(r, resume=args.resume), run)
    finally:
        _end_distributed()
    print(json.dumps({k: v for k, v in metrics.items() if k != "data"}, indent=2, default=str))
    print(f"adapter written to {run.training['output_dir']}")
    return 0


def _end_distributed() -> None:
    """Tear down the process group of a torchrun / accelerate launch (exiting without it can crash at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _with_source(path: str, build, raw: Any):
    """Call ``build(raw)``; a config or target error it raises names the config file (data errors name theirs)."""
    try:
        return build(raw)
    except (ConfigError, TargetError) as err:
        raise type(err)(f"{path}: {err}") from err


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from loramoe.generate import read_prompts

    prompts = list(args.prompt or [])
    if args.file:
        prompts += read_prompts(args.file)
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --file PROMPTS.txt/.jsonl")
    return prompts


def _load(args: argparse.Namespace):
    from loramoe.train import load_trained

    return load_trained(args.adapter, base=args.model, dtype=args.dtype)


def _cmd_generate(args: argparse.Namespace) -> int:
    from loramoe.generate import generate

    prompts = _read_prompts(args)
    model, tokenizer = _load(args)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    for prompt, output in zip(prompts, outputs):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "output": output}, ensure_ascii=False))
        else:
            print(f">>> {prompt}\n{output}\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from loramoe.generate import chat_loop

    model, tokenizer = _load(args)
    chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    """Adapt the base model with a LoRAMoE config and print what was adapted (the smallest real job)."""
    import loramoe
    from loramoe.models import load_base

    model, _ = load_base(args.model)
    cfg = loramoe.LoRAMoEConfig(num_experts=args.num_experts, rank=args.rank)
    loramoe.inject(model, cfg)
    print(loramoe.summary(model))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    p.add_argument(
        "--adapter", default=None, help="a training output / adapter directory (loramoe, PEFT or full)"
    )
    p.add_argument("--dtype", default="float32", help="float32 (default, CPU), bfloat16, float16 or auto")


def build_parser() -> argparse.ArgumentParser:
    from loramoe import __version__
    from loramoe.config import LoRAMoEConfig, field_docs

    parser = argparse.ArgumentParser(
        prog="loramoe", description="LoRAMoE fine-tuning for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"loramoe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    from loramoe.train import LoraBaselineConfig, RunConfig

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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="generate answers with a base model and an adapter")
    _model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="prompts: .txt (one per line) or .jsonl/.json")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (/reset clears the history, /exit quits)")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("info", help="adapt a base model and print the adapted layers and parameter counts")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.set_defaults(func=_cmd_info)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands defined next to the functions they call (evaluation, analysis, demo)."""
    import importlib
    import importlib.util

    for module_name in ("loramoe.evaluate", "loramoe.analysis", "loramoe.demo"):
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        register = getattr(module, "add_subcommands", None)
        if register is not None:
            yield register


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except LoRAMoEError as err:
        if args.verbose:
            raise
        message = " ".join(str(err).split("\n"))  # one line, even when a wrapped library message has several
        print(f"loramoe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loramoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
