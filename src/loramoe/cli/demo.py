"""``loramoe demo``: LoRA against LoRAMoE on the bundled model (the demo application, ``loramoe.demo``)."""

from __future__ import annotations

import argparse

from loramoe.cli.overrides import int_flag


def register(sub: argparse._SubParsersAction) -> None:
    from loramoe.config import field_docs
    from loramoe.demo.run import DemoConfig

    docs = field_docs(DemoConfig)
    p = sub.add_parser("demo", help="LoRA vs LoRAMoE on the bundled model: knowledge kept, tasks learned")
    p.add_argument("--model", default=DemoConfig.model, help=docs["model"])
    p.add_argument("--out", dest="output_dir", default=DemoConfig.output_dir, help=docs["output_dir"])
    p.add_argument("--quick", action="store_true", help=docs["quick"])
    p.add_argument("--seed", type=int_flag, default=0, help=docs["seed"])
    for name in ("steps", "train_per_task", "test_per_task", "heldout_facts"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int_flag, default=None, help=docs[name])
    p.add_argument(
        "--learning-rate", type=float, default=DemoConfig.learning_rate, help=docs["learning_rate"]
    )
    p.add_argument("--threads", type=int_flag, default=None, help=docs["threads"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loramoe.demo.evaluation import results_table
    from loramoe.demo.run import DemoConfig, run_demo

    keys = {"model", "output_dir", "quick", "seed", "steps", "train_per_task", "test_per_task", "heldout_facts",
            "learning_rate", "progress", "threads"}  # fmt: skip
    results = run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in keys}))
    print(results_table(results), end="")
    print(f"results, adapters and routing figures in {args.output_dir}")
    return 0
