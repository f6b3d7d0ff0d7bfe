"""``loramoe lm-eval``: lm-eval's own command line with the ``loramoe`` model type registered and this project's
tasks included.

lm-eval's command line imports no third-party code (no plugin entry point; ``--include_path`` loads tasks, not
models), so the model type is registered here before handing every argument to it::

    loramoe lm-eval run --model loramoe \\
        --model_args pretrained=smollm2-135m-instruct,adapter=runs/sft/adapter \\
        --tasks loramoe_knowledge --limit 100 --device cpu --apply_chat_template

``--include_path`` pointing at this project's tasks (data from ``$LORAMOE_DATA_DIR``, else downloaded from its pinned sources into the ``datasets``
cache) is
added unless one is given. (lm-eval's command line also indexes its own ~15,000 task files, about a minute on a
busy 2-core machine; ``loramoe eval`` does not.)
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="lm-eval's command line with the loramoe model type and this project's tasks",
        description="Every argument goes to lm-eval unchanged (`loramoe lm-eval run --help` lists them).",
        add_help=False,  # -h / --help belong to lm-eval
        prefix_chars="\0",  # no option of its own: every argument, dashes and all, is lm-eval's
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm_eval_command_line(args.lm_eval_args)
    return 0


def lm_eval_command_line(args: list[str]) -> None:
    """Run lm-eval's command line on ``args`` (as ``lm-eval`` takes them) with the model type and tasks added."""
    from lm_eval.__main__ import cli_evaluate

    import loramoe.eval.lm_eval_model  # noqa: F401  (registers the model type)
    from loramoe.errors import ConfigError
    from loramoe.eval.tasks import task_dir

    args = list(args)
    wants_help = not args or args[0] in ("-h", "--help")
    if not wants_help and not any(a.startswith("--include_path") for a in args):
        try:
            args += ["--include_path", str(task_dir())]
        except ConfigError as e:
            log.warning("loramoe tasks not included: %s", e)
    # lm-eval's command line reads only sys.argv; it is put back afterwards.
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
