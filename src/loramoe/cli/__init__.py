"""The ``loramoe`` command line: one module per subcommand, each parsing its flags and calling the library.

Every error loramoe raises on purpose ends in one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loramoe.errors import FileSystemError, LoRAMoEError

# The subcommands, in the order ``loramoe --help`` lists them; each module has ``register(subparsers)``.
COMMANDS = (
    "train", "generate", "chat", "serve", "info", "evaluate", "compare", "routing", "demo", "harness", "data",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from loramoe._version import __version__

    parser = argparse.ArgumentParser(
        prog="loramoe", description="LoRAMoE fine-tuning for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"loramoe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"loramoe.cli.{name}").register(sub)
    return parser


def _error_line(line: str) -> None:
    """Write the line and its newline in one write: processes that fail together (the ranks of a torchrun) then
    never run their lines together on a shared stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by transformers' Trainer whenever it is installed) looks for an optional CPU kernel on
    # the Hub and warns when it cannot fetch it; its built-in kernels do the same work, so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except LoRAMoEError as err:
        if args.verbose:
            raise
        message = " ".join(str(err).split("\n"))  # one line, even when a wrapped library message has several
        _error_line(f"loramoe {args.command}: error: {message}")
        return 2
    except OSError as err:  # a fault of the file system that no command turned into its own error
        if args.verbose:
            raise
        line = FileSystemError.from_fault(err, err.filename or Path.cwd(), doing=f"loramoe {args.command}")
        _error_line(f"loramoe {args.command}: error: {line}")
        return 2
    except KeyboardInterrupt:
        print(f"loramoe {args.command}: interrupted", file=sys.stderr)
        return 130
