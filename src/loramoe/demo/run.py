"""The demo: does fine-tuning erase what the model knew? Plain LoRA against LoRAMoE on the bundled SmolLM2.

Design decisions:
- Offline and self-contained: world facts in ``demo/data/facts.json`` (SFT facts are trained on, held-out facts
  are the knowledge test) and three procedurally generated downstream tasks the base model cannot do (word lists
  in ``demo/data/downstream.json``). Nothing is copied from a benchmark.
- The product path: the data is written as JSONL into the output folder, each method is trained with
  ``loramoe.training.train.train(RunConfig)`` and read back with ``load_trained``; ``routing_report`` draws the heatmap.
- Both runs share data, steps, learning rate, batch and seed; the LoRA baseline's rank is matched to LoRAMoE's
  trainable budget (``matched_lora_rank``). LoRAMoE uses the reference settings (8 experts of rank 4, alpha 32, LBC
  delta 0.1, weight 0.1); the learning rate is aggressive (1e-3) so forgetting shows within minutes. Settings were
  chosen once, not tuned until one method wins.
- Facts are scored by alias containment (a sentence that contains the answer counts); downstream tasks by exact
  match of the stripped output (the format is the task).
"""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from loramoe.errors import ConfigError
from loramoe.files import atomic_write_text

TASKS = ("review_code", "sort_words", "sum_format")
METHODS = ("lora", "loramoe")


def load_demo_json(name: str) -> Any:
    """A JSON file of the demo's ``data`` folder."""
    return json.loads(resources.files("loramoe.demo").joinpath("data", name).read_text(encoding="utf-8"))


def demo_facts() -> dict[str, list[dict[str, Any]]]:
    """The facts: ``{"sft": [...], "heldout": [...]}``, each ``{"question", "answers", "category"}``."""
    data = load_demo_json("facts.json")
    return {"sft": data["sft"], "heldout": data["heldout"]}


def _review(rng: random.Random, words: dict[str, Any]) -> tuple[str, str]:
    mood = rng.choice(("positive", "negative"))
    adj1, adj2 = rng.sample(words[mood], 2)
    text = f"{rng.choice(words['openers'])} {rng.choice(words['products'])}. It was {adj1} and {adj2}."
    return f"Label this review with its code word.\nReview: {text}", words["labels"][mood]


def _sort(rng: random.Random, words: list[str]) -> tuple[str, str]:
    picked = rng.sample(words, rng.randint(3, 5))
    return f"Sort these words alphabetically: {', '.join(picked)}", ", ".join(sorted(picked))


def _sum(rng: random.Random, _: Any) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}.", f"#{a + b}#"


_GENERATORS = {
    "review_code": (_review, "review"),
    "sort_words": (_sort, "sort_words"),
    "sum_format": (_sum, None),
}


def downstream_items(
    task: str, n_train: int, n_test: int, *, seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Generate a downstream task's train and test items (``{"prompt", "completion"}``), disjoint by prompt.

    The test items depend only on ``(task, seed, n_test)``: changing ``n_train`` leaves the test set alone.
    """
    if task not in _GENERATORS:
        raise ConfigError(f"unknown demo task {task!r}; one of {list(TASKS)}")
    make, key = _GENERATORS[task]
    words = load_demo_json("downstream.json")[key] if key else None
    out: dict[str, list[dict[str, str]]] = {}
    seen: set[str] = set()
    for split, n in (("test", n_test), ("train", n_train)):
        rng, items = random.Random(f"{task}/{split}/{seed}"), []
        for _ in range(100 * n + 100):  # the spaces are large: duplicates are rare
            if len(items) == n:
                break
            prompt, answer = make(rng, words)
            if prompt not in seen:
                seen.add(prompt)
                items.append({"prompt": prompt, "completion": answer})
        out[split] = items
    return out


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

    model: str = "smollm2-135m-instruct"
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
            value = getattr(self, name)
            if value is None:
                setattr(self, name, default)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


def _alias_contained(prediction: str, golds: list[str]) -> float:
    try:
        from loramoe.eval.metrics import alias_contained
    except ImportError:  # pragma: no cover - metrics.py is optional here
        import re

        def norm(s: str) -> str:
            s = re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", "", s.lower()))
            return " ".join(s.split())

        return float(any(norm(g) and f" {norm(g)} " in f" {norm(prediction)} " for g in golds))
    return alias_contained(prediction, golds)


def evaluate_demo(model: Any, tokenizer: Any, data: dict[str, Any], cfg: DemoConfig) -> dict[str, Any]:
    """Held-out fact accuracy (alias containment) and each downstream task's exact-match accuracy."""
    from loramoe.inference.generate import generate

    groups = {"facts_heldout": data["facts"]["heldout"]} | {
        task: data["tasks"][task]["test"] for task in TASKS
    }
    prompts = [item.get("question") or item["prompt"] for items in groups.values() for item in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=64,
                       progress=cfg.progress)  # fmt: skip
    scores, samples, i = {}, {}, 0
    for name, items in groups.items():
        outs, i = outputs[i : i + len(items)], i + len(items)
        if name.startswith("facts"):
            hits = [_alias_contained(o, item["answers"]) for o, item in zip(outs, items)]
        else:
            hits = [float(o.strip() == item["completion"]) for o, item in zip(outs, items)]
        scores[name] = sum(hits) / len(hits)
        samples[name] = [
            {"prompt": p.get("question") or p["prompt"], "output": o} for p, o in zip(items[:3], outs)
        ]
    scores["downstream_mean"] = sum(scores[t] for t in TASKS) / len(TASKS)
    return {"scores": scores, "samples": samples}


def build_demo_data(cfg: DemoConfig) -> dict[str, Any]:
    """The facts (held-out cut to ``heldout_facts``) and each task's generated items, written as JSONL too."""
    facts = demo_facts()
    facts["heldout"] = facts["heldout"][: cfg.heldout_facts]
    tasks = {t: downstream_items(t, cfg.train_per_task, cfg.test_per_task, seed=cfg.seed) for t in TASKS}
    folder = Path(cfg.output_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, records: list[dict[str, Any]]) -> str:
        atomic_write_text(folder / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return str(folder / name)

    files = {
        "knowledge": write("train_facts.jsonl", [{"question": f["question"], "answers": f["answers"]}
                                                 for f in facts["sft"]]),
        "downstream": write("train_downstream.jsonl", [r for t in TASKS for r in tasks[t]["train"]]),
    }  # fmt: skip
    write("test_facts_heldout.jsonl", facts["heldout"])
    for t in TASKS:
        write(f"test_{t}.jsonl", tasks[t]["test"])
    return {"facts": facts, "tasks": tasks, "train_files": files}


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
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig) -> dict[str, Any]:
    from loramoe.analysis.report import routing_report
    from loramoe.data.sources import examples_from_records
    from loramoe.models.base import load_base
    from loramoe.models.trained import load_trained
    from loramoe.training.train import train

    out, clock = Path(cfg.output_dir), _Clock()
    data = build_demo_data(cfg)
    results: dict[str, Any] = {"config": asdict(cfg), "scores": {}, "samples": {}}
    with clock.phase("evaluate base"):
        model, tokenizer = load_base(cfg.model)
        base = evaluate_demo(model, tokenizer, data, cfg)
    results["scores"]["base"], results["samples"]["base"] = base["scores"], base["samples"]
    for method in METHODS:
        with clock.phase(f"train {method}"):
            torch.manual_seed(cfg.seed)  # the adapter's initialisation happens before the Trainer seeds
            train(run_config(cfg, method, data["train_files"]))
        with clock.phase(f"evaluate {method}"):
            model, tokenizer = load_trained(out / method)
            evaluated = evaluate_demo(model, tokenizer, data, cfg)
        results["scores"][method], results["samples"][method] = evaluated["scores"], evaluated["samples"]
    with clock.phase("routing"):  # the LoRAMoE model is the one loaded last
        tasks = {"facts_heldout": examples_from_records(data["facts"]["heldout"], name="facts_heldout",
                                                        format="qa", task_type="knowledge"),
                 "facts_sft": examples_from_records(data["facts"]["sft"], name="facts_sft", format="qa",
                                                    task_type="knowledge")}  # fmt: skip
        for task in TASKS:
            tasks[task] = examples_from_records(
                data["tasks"][task]["test"], name=task, task_type="downstream"
            )
        report = routing_report(
            model,
            tokenizer,
            tasks,
            out,
            max_examples=16 if cfg.quick else 32,
            plot=cfg.plot,
            progress=cfg.progress,
        )
    results["routing"] = {"task_types": report["task_types"], "files": report["files"]}
    results["times"] = {"phases": clock.phases, "total": clock.total()}
    atomic_write_text(out / "demo_results.json", json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(out / "demo_results.md", results_table(results))
    return results


def results_table(results: dict[str, Any]) -> str:
    """The before/after table: knowledge kept (held-out facts) and downstream learned, per model."""
    head = "| model | held-out facts (knowledge) | " + " | ".join(TASKS) + " | downstream mean |"
    lines = [head, "|---" * (3 + len(TASKS)) + "|"]
    names = {"base": "base (no fine-tuning)", "lora": "LoRA (PEFT)", "loramoe": "LoRAMoE (LBC)"}
    for key, scores in results["scores"].items():
        cells = [scores["facts_heldout"], *(scores[t] for t in TASKS), scores["downstream_mean"]]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    total = results.get("times", {}).get("total")
    if total:
        lines.append(f"\ntime: {total['wall_s']:.0f} s wall, {total['user_cpu_s']:.0f} s user CPU")
    return "\n".join(lines) + "\n"
