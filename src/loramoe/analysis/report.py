"""Routing analysis: where each task's tokens go among the experts, per layer and per expert group.

Design decisions:
- Examples are encoded exactly as for training (``ExampleEncoder``: template, answer appended), so the router
  sees what it saw while learning; only non-padding prompt + answer positions count.
- Every mean is per example first (mean over its positions), then over examples, the way ``routing.group_mass``
  and the LBC weigh samples: a long example does not outvote short ones.
- A transformer layer's number is read from its module name (``...layers.7.mlp.up_proj`` -> 7); the modules of
  one layer (gate/up/down) are averaged for the per-layer heatmap and reported separately in the JSON.
- The figures are drawn by ``plots.py`` (matplotlib, the ``plots`` extra, imported only when drawing).

Dimensions: L adapted linears, N experts, K expert groups (= task types), B batch, T tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loramoe.analysis.plots import draw_routing
from loramoe.data.dataset import DataCollatorForLoRAMoE, ExampleEncoder
from loramoe.data.formats import Example
from loramoe.errors import ConfigError
from loramoe.files import atomic_write_text
from loramoe.inject import adapted_modules, get_config
from loramoe.routing import RouterRecorder, per_sample_mean
from loramoe.validation import check_value, integer

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_index(module_name: str) -> int:
    """The transformer layer a module belongs to, from its name (``model.layers.7.mlp.up_proj`` -> 7); -1 if none."""
    match = _LAYER_RE.search(module_name)
    return int(match.group(1)) if match else -1


@torch.no_grad()
def expert_usage(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    template: str = "auto",
    max_length: int = 512,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's mean router probabilities in every adapted linear.

    Args:
        model: a model with LoRAMoE layers.
        tokenizer: its tokenizer.
        examples: the examples (prompt + answer are both run through the model).
        batch_size: examples per forward.
        template: as in ``ExampleEncoder`` (match the training run's).
        max_length: tokens per example (longer ones are cut as in training).
        progress: show a progress bar.

    Returns:
        ``(probs, task_types)``: module name -> ``(E, N)`` float32 (each row sums to 1; mean over the example's
        non-padding positions) and the examples' task types ``(E,)``.
    """
    if not adapted_modules(model):
        raise ConfigError("routing analysis needs a LoRAMoE model; this one has no LoRAMoE layers")
    check_value("batch_size", batch_size, integer(1))
    if not examples:
        raise ConfigError("routing analysis needs at least one example")
    encoder = ExampleEncoder(tokenizer, template=template, max_length=max_length)
    collate = DataCollatorForLoRAMoE(tokenizer)
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="routing", disable=not progress):
            batch = collate([encoder.encode(e)[0] for e in examples[start : start + batch_size]])
            with RouterRecorder(model, detach=True) as rec:
                model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
            for name, (probs_BTN,) in rec.probs.items():  # one forward: one record per module
                mean_BN = per_sample_mean(probs_BTN, batch["attention_mask"].to(device))
                out.setdefault(name, []).append(mean_BN.cpu())
    finally:
        model.train(was_training)
    task_types = torch.tensor([e.task_type for e in examples], dtype=torch.long)
    return {name: torch.cat(chunks) for name, chunks in out.items()}, task_types


def summarize(
    usage: Mapping[str, Mapping[str, torch.Tensor]],
    task_types: Mapping[str, torch.Tensor],
    *,
    group_of_expert: Sequence[int],
    task_names: Sequence[str],
) -> dict[str, Any]:
    """Turn per-example usage into the report's numbers (pure: tensors in, JSON-ready dict out).

    Args:
        usage: task -> module name -> ``(E, N)`` per-example mean probabilities (``expert_usage``).
        task_types: task -> ``(E,)`` task types of its examples.
        group_of_expert: the task type each expert serves (``LoRAMoEConfig.group_of_expert()``).
        task_names: names of the task types (= names of the expert groups).

    Returns:
        ``tasks``: per task its ``examples``, ``task_type`` (the most common one), ``mean`` (N), ``per_layer``
        (layer -> N), ``per_module`` (name -> N) and ``group_mass`` (group name -> mass; sums to 1);
        ``task_types``: per task type present, its ``examples`` and ``group_mass`` over all its examples.
    """
    onehot_NK = torch.nn.functional.one_hot(torch.as_tensor(list(group_of_expert)), len(task_names)).float()
    tasks: dict[str, Any] = {}
    by_type: dict[int, list[torch.Tensor]] = {}
    for task, modules in usage.items():
        names = list(modules)
        stacked_LEN = torch.stack([modules[n] for n in names])  # (L, E, N)
        per_example_EN = stacked_LEN.mean(0)  # (E, N): mean over adapted linears
        types = task_types[task]
        for t in types.unique().tolist():
            by_type.setdefault(int(t), []).append(per_example_EN[types == t])
        layers = sorted({layer_index(n) for n in names})
        per_layer = {
            str(i): stacked_LEN[[j for j, n in enumerate(names) if layer_index(n) == i]].mean((0, 1)).tolist()
            for i in layers
        }
        mean_N = per_example_EN.mean(0)
        tasks[task] = {
            "examples": int(per_example_EN.shape[0]),
            "task_type": task_names[int(types.mode().values)],
            "mean": mean_N.tolist(),
            "per_layer": per_layer,
            "per_module": {n: stacked_LEN[j].mean(0).tolist() for j, n in enumerate(names)},
            "group_mass": dict(zip(task_names, (mean_N @ onehot_NK).tolist())),
        }
    type_mass = {}
    for t in sorted(by_type):
        rows_EN = torch.cat(by_type[t])
        type_mass[task_names[t]] = {
            "examples": int(rows_EN.shape[0]),
            "group_mass": dict(zip(task_names, (rows_EN.mean(0) @ onehot_NK).tolist())),
        }
    return {"tasks": tasks, "task_types": type_mass}


def routing_report(
    model: nn.Module,
    tokenizer: Any,
    task_examples: Mapping[str, Sequence[Example]],
    out_dir: str | Path,
    *,
    max_examples: int = 64,
    batch_size: int = 8,
    template: str = "auto",
    max_length: int = 512,
    plot: bool = True,
    prefix: str = "routing",
    progress: bool = True,
) -> dict[str, Any]:
    """Record where each task's tokens are routed and write the JSON, a markdown table and the figures.

    Writes into ``out_dir``: ``{prefix}.json`` (every number), ``{prefix}.md`` (the group-mass table),
    ``{prefix}_layers.png`` (tasks x experts heatmap per layer), ``{prefix}_mean.png`` (averaged over layers)
    and ``{prefix}_groups.png`` (mass per expert group, bars).

    Args:
        model: a LoRAMoE-adapted model.
        tokenizer: its tokenizer.
        task_examples: task name -> its examples (their ``task_type`` decides the task-type rows).
        out_dir: the output folder (created).
        max_examples: the first this many examples of each task are used.
        batch_size: examples per forward.
        template: the prompt template, as in training (``ExampleEncoder``).
        max_length: tokens per example.
        plot: draw the PNGs (needs matplotlib).
        prefix: file name prefix.
        progress: show progress bars.

    Returns:
        The report (as written to the JSON): ``num_experts``, ``group_of_expert``, ``task_names``, ``layers``,
        ``tasks`` and ``task_types`` (see ``summarize``), and ``files``.

    Raises:
        ConfigError: no tasks, a task without examples, a bad ``max_examples``, or a model without LoRAMoE layers.
    """
    _check_request(task_examples, max_examples)
    cfg = get_config(model)
    usage, types = {}, {}
    for name, examples in task_examples.items():
        usage[name], types[name] = expert_usage(
            model, tokenizer, list(examples)[:max_examples], batch_size=batch_size, template=template,
            max_length=max_length, progress=progress,
        )  # fmt: skip
    report: dict[str, Any] = {
        "num_experts": cfg.num_experts,
        "group_of_expert": cfg.group_of_expert(),
        "task_names": list(cfg.task_names),
        **summarize(usage, types, group_of_expert=cfg.group_of_expert(), task_names=cfg.task_names),
    }
    report["layers"] = sorted({int(i) for t in report["tasks"].values() for i in t["per_layer"]})
    report["files"] = _write(report, Path(out_dir), prefix, plot)
    return report


def _write(report: dict[str, Any], out: Path, prefix: str, plot: bool) -> dict[str, str]:
    """Write the figures (when ``plot``), the table and the JSON (last, with the file list); return the list."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{prefix}.json"), "table": str(out / f"{prefix}.md")}
    if plot:
        files |= draw_routing(report, out, prefix=prefix)
    report = {**report, "files": files}
    atomic_write_text(out / f"{prefix}.md", routing_markdown(report))
    atomic_write_text(out / f"{prefix}.json", json.dumps(report, indent=1))
    return files


def _check_request(task_examples: Mapping[str, Sequence[Example]], max_examples: Any) -> None:
    if not task_examples:
        raise ConfigError("routing_report needs at least one task with examples")
    check_value("max_examples", max_examples, integer(1))
    empty = [name for name, exs in task_examples.items() if not exs]
    if empty:
        raise ConfigError(f"task(s) {empty} have no examples")


def routing_markdown(report: Mapping[str, Any]) -> str:
    """The group-mass table: one row per task and per task type, one column per expert group."""
    groups = list(report["task_names"])
    head = "| task | type | examples | " + " | ".join(f"mass on {g} experts" for g in groups) + " |"
    lines = [head, "|" + "---|" * (3 + len(groups))]
    for name, task in report["tasks"].items():
        masses = " | ".join(f"{task['group_mass'][g]:.3f}" for g in groups)
        lines.append(f"| {name} | {task['task_type']} | {task['examples']} | {masses} |")
    for type_name, row in report["task_types"].items():
        masses = " | ".join(f"**{row['group_mass'][g]:.3f}**" for g in groups)
        lines.append(f"| **all {type_name}** | {type_name} | {row['examples']} | {masses} |")
    return "\n".join(lines) + "\n"
