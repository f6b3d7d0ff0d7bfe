"""The demo's driver: does fine-tuning erase what the model knew? Plain LoRA against LoRAMoE on the bundled SmolLM2.

Design decisions:
- The product path: the data (``loramoe.demo.items``) is written as JSONL into the output folder, each method is
  trained with ``loramoe.training.train.train(RunConfig)`` and read back with ``load_trained``, every model is
  scored by the evaluation engine (``loramoe.demo.evaluation``), and ``routing_report`` draws the heatmap.
- Both runs share data, steps, learning rate, batch and seed; the LoRA baseline's rank is matched to LoRAMoE's
  trainable budget (``matched_lora_rank``). LoRAMoE uses the reference settings (8 experts of rank 4, alpha 32, LBC
  delta 0.1, weight 0.1); the learning rate is aggressive (1e-3) so forgetting shows within minutes. Settings were
  chosen once, not tuned until one method wins.
- A clock records wall and CPU seconds per phase, because the machine may be shared.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loramoe.demo.evaluation import evaluate_demo, results_table
from loramoe.demo.items import TASKS, build_demo_data
from loramoe.files import atomic_write_text
from loramoe.inference.threads import torch_threads
from loramoe.models.bundled import DEFAULT_MODEL
from loramoe.validation import check_fields, integer, number, optional

METHODS = ("lora", "loramoe")


@dataclass
class DemoConfig:
    """Settings of ``run_demo`` (None: the default of the mode, ``quick`` or not).

    Attributes:
        model: base model: the bundled ``smollm2-135m-instruct`` or a local HF directory.
        output_dir: where the data, both adapters, the figures and ``demo_results.json`` go.
        quick: a short run (16 steps of 8 per method, smaller test sets; about 4 minutes on 2 cores) instead of
            the default (48 steps of 8; about 10 minutes). See docs/demo.md for measured times.
        seed: seeds data generation, adapter initialisation and training.
        steps: optimizer steps per method (default 48, quick 16).
        learning_rate: the same for both methods (aggressive on purpose, so forgetting shows).
        batch_size: training batch size.
        train_per_task: generated training items per downstream task (default 160, quick 48).
        test_per_task: test items per downstream task (default 30, quick 12).
        heldout_facts: held-out facts evaluated (default all, quick 24).
        max_new_tokens: tokens generated per evaluation prompt.
        progress: show progress bars.
        plot: draw the routing figures (needs matplotlib).
        threads: CPU threads for torch (None: torch's default); on a machine busy with other work, 1 is faster.
    """

    model: str = DEFAULT_MODEL
    output_dir: str = "outputs/demo"
    quick: bool = False
    seed: int = 0
    steps: int | None = None
    learning_rate: float = 1e-3
    batch_size: int = 8
    train_per_task: int | None = None
    test_per_task: int | None = None
    heldout_facts: int | None = None
    max_new_tokens: int = 20
    progress: bool = True
    plot: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        defaults = (16, 48, 12, 24) if self.quick else (48, 160, 30, None)
        for name, default in zip(("steps", "train_per_task", "test_per_task", "heldout_facts"), defaults):
            if getattr(self, name) is None:
                setattr(self, name, default)
        check_fields(
            self,
            {
                "steps": integer(1),
                "train_per_task": integer(1),
                "test_per_task": integer(1),
                "heldout_facts": optional(integer(1)),
                "learning_rate": number(0, low_open=True),
                "batch_size": integer(1),
                "max_new_tokens": integer(1),
                "threads": optional(integer(1)),
            },
        )


def run_config(cfg: DemoConfig, method: str, files: dict[str, str]) -> Any:
    """The ``RunConfig`` of one method: same data, steps, lr, batch and seed for both."""
    from loramoe.config import LoRAMoEConfig
    from loramoe.training.run_config import RunConfig

    return RunConfig(
        model=cfg.model,
        method=method,
        loramoe=LoRAMoEConfig(num_experts=8, rank=4, alpha=32.0, dropout=0.05, lbc_delta=0.1, lbc_weight=0.1),
        data={
            "sources": [
                {"path": files["knowledge"], "name": "facts", "task_type": "knowledge"},
                {"path": files["downstream"], "name": "downstream", "task_type": "downstream"},
            ],
            "max_length": 256,
            "seed": cfg.seed,
        },  # fmt: skip
        training={
            "output_dir": str(Path(cfg.output_dir) / method),
            "max_steps": cfg.steps,
            "per_device_train_batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "warmup_steps": max(1, round(0.03 * cfg.steps)),
            "logging_steps": max(1, cfg.steps // 6),
            "save_strategy": "no",
            "seed": cfg.seed,
            "data_seed": cfg.seed,
            "disable_tqdm": not cfg.progress,
        },
    )


class _Clock:
    """Wall and CPU (user) seconds per phase; the machine may be shared, so CPU time is the fairer cost."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def phase(self, name: str) -> _Clock:
        self._name, self._wall, self._cpu = (
            name,
            time.perf_counter(),
            resource.getrusage(resource.RUSAGE_SELF),
        )
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        self.phases[self._name] = {
            "wall_s": round(time.perf_counter() - self._wall, 1),
            "user_cpu_s": round(cpu.ru_utime - self._cpu.ru_utime, 1),
            "system_cpu_s": round(cpu.ru_stime - self._cpu.ru_stime, 1),
        }

    def total(self) -> dict[str, float]:
        keys = ("wall_s", "user_cpu_s", "system_cpu_s")
        return {k: round(sum(p[k] for p in self.phases.values()), 1) for k in keys}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Measure the base, fine-tune plain LoRA and LoRAMoE on the same data, evaluate both, draw the routing.

    Writes into ``cfg.output_dir``: ``data/`` (the JSONL), ``lora/`` and ``loramoe/`` (adapters), ``routing*``
    (figures, table, JSON of the LoRAMoE model's routing), ``demo_results.json`` and ``demo_results.md``.

    Args:
        cfg: the demo settings.

    Returns:
        The results: ``config``, ``scores`` (per model: ``facts_heldout``, each task,
        ``downstream_mean``), ``samples`` (a few outputs), ``routing`` (task-type group masses), ``times``.
    """
    with torch_threads(cfg.threads):
        return _run(cfg)


def _run(cfg: DemoConfig) -> dict[str, Any]:
    from loramoe.models.base import load_base
    from loramoe.models.trained import load_trained
    from loramoe.training.train import train

    out, clock = Path(cfg.output_dir), _Clock()
    data = build_demo_data(out / "data", heldout_facts=cfg.heldout_facts, train_per_task=cfg.train_per_task,
                           test_per_task=cfg.test_per_task, seed=cfg.seed)  # fmt: skip
    results: dict[str, Any] = {"config": asdict(cfg), "scores": {}, "samples": {}}

    def measure(name: str, model: Any, tokenizer: Any) -> None:
        scored = evaluate_demo(
            model, tokenizer, data, max_new_tokens=cfg.max_new_tokens, progress=cfg.progress
        )
        results["scores"][name], results["samples"][name] = scored["scores"], scored["samples"]

    with clock.phase("evaluate base"):
        measure("base", *load_base(cfg.model))
    for method in METHODS:
        with clock.phase(f"train {method}"):
            torch.manual_seed(cfg.seed)  # the adapter's initialisation happens before the Trainer seeds
            train(run_config(cfg, method, data["train_files"]))
        with clock.phase(f"evaluate {method}"):
            model, tokenizer = load_trained(out / method)
            measure(method, model, tokenizer)
    with clock.phase("routing"):  # the LoRAMoE model is the one loaded last
        report = _routing(model, tokenizer, data, cfg)
    results["routing"] = {"task_types": report["task_types"], "files": report["files"]}
    results["times"] = {"phases": clock.phases, "total": clock.total()}
    atomic_write_text(out / "demo_results.json", json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(out / "demo_results.md", results_table(results))
    return results


def _routing(model: Any, tokenizer: Any, data: dict[str, Any], cfg: DemoConfig) -> dict[str, Any]:
    """``routing_report`` over the held-out facts, the SFT facts and each task's test items."""
    from loramoe.analysis.report import routing_report
    from loramoe.data.sources import examples_from_records

    tasks = {name: examples_from_records(data["facts"][split], name=name, format="qa", task_type="knowledge")
             for name, split in (("facts_heldout", "heldout"), ("facts_sft", "sft"))}  # fmt: skip
    for task in TASKS:
        tasks[task] = examples_from_records(data["tasks"][task]["test"], name=task, task_type="downstream")
    return routing_report(model, tokenizer, tasks, Path(cfg.output_dir), max_examples=16 if cfg.quick else 32,
                          plot=cfg.plot, progress=cfg.progress)  # fmt: skip
