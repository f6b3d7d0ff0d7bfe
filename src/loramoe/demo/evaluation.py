"""How the demo scores a model, and its before/after table.

The scoring is :func:`loramoe.eval.engine.score_item_sets`'s: held-out facts by alias containment (a sentence that
contains an accepted answer counts), the made-up downstream tasks by verbatim match of the stripped output (the
format is the task). Every prompt is generated in one pooled call of batch 64 (greedy, the chat template when the
tokenizer has one), so the outputs do not depend on how the prompts are grouped into tasks.
"""

from __future__ import annotations

from typing import Any

from loramoe.eval.engine import Task, score_item_sets

FACTS = "facts_heldout"


def evaluate_demo(
    model: Any, tokenizer: Any, data: dict[str, Any], *, max_new_tokens: int, progress: bool
) -> dict[str, Any]:
    """Held-out fact accuracy and each downstream task's exact-output accuracy, with three sample outputs each.

    Args:
        model: The base or a fine-tuned model.
        tokenizer: Its tokenizer.
        data: ``{"facts": {"heldout": [{"question", "answers"}, ...]}, "tasks": {name: {"test": [{"prompt",
            "completion"}, ...]}}}`` (what ``build_demo_data`` returns).
        max_new_tokens: Tokens generated per prompt.
        progress: Show a progress bar.

    Returns:
        ``{"scores": {"facts_heldout", <task>..., "downstream_mean"}, "samples": {name: [{"prompt", "output"}]}}``.
    """
    tasks = list(data["tasks"])
    sets = {FACTS: [{"prompt": f["question"], "golds": f["answers"]} for f in data["facts"]["heldout"]]}
    for task in tasks:
        sets[task] = [
            {"prompt": it["prompt"], "golds": [it["completion"]]} for it in data["tasks"][task]["test"]
        ]
    specs = {name: Task("contains" if name == FACTS else "verbatim", chat_template=None,
                        max_new_tokens=max_new_tokens) for name in sets}  # fmt: skip
    results = score_item_sets(
        model, tokenizer, sets, specs, batch_size=64, pool_generation=True, progress=progress
    )
    scores = {name: result.score for name, result in results.items()}
    scores["downstream_mean"] = sum(scores[t] for t in tasks) / len(tasks)
    samples = {
        name: [{"prompt": it["prompt"], "output": out} for it, out in zip(sets[name][:3], result.predictions)]
        for name, result in results.items()
    }
    return {"scores": scores, "samples": samples}


def results_table(results: dict[str, Any]) -> str:
    """The before/after table: knowledge kept (held-out facts) and downstream learned, per model."""
    tasks = [
        name for name in next(iter(results["scores"].values())) if name not in (FACTS, "downstream_mean")
    ]
    head = "| model | held-out facts (knowledge) | " + " | ".join(tasks) + " | downstream mean |"
    lines = [head, "|---" * (3 + len(tasks)) + "|"]
    names = {"base": "base (no fine-tuning)", "lora": "LoRA (PEFT)", "loramoe": "LoRAMoE (LBC)"}
    for key, scores in results["scores"].items():
        cells = [scores[FACTS], *(scores[t] for t in tasks), scores["downstream_mean"]]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    total = results.get("times", {}).get("total")
    if total:
        lines.append(f"\ntime: {total['wall_s']:.0f} s wall, {total['user_cpu_s']:.0f} s user CPU")
    return "\n".join(lines) + "\n"
