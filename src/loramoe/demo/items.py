"""The demo's data: world facts it asks about and three made-up downstream tasks it teaches.

Design decisions:

- Offline and self-contained: world facts in ``demo/data/facts.json`` (SFT facts are trained on, held-out facts are
  the knowledge test) and three procedurally generated downstream tasks the base model cannot do (word lists in
  ``demo/data/downstream.json``). Nothing is copied from a benchmark.
- Generators are seeded by strings (``"<task>/<split>/<seed>"``), so items do not depend on ``PYTHONHASHSEED`` or on
  how many training items are asked for; train and test prompts never overlap.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from loramoe.errors import ConfigError
from loramoe.files import atomic_write_text

TASKS = ("review_code", "sort_words", "sum_format")


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


def build_demo_data(
    folder: str | Path, *, heldout_facts: int | None, train_per_task: int, test_per_task: int, seed: int
) -> dict[str, Any]:
    """The facts (held-out cut to ``heldout_facts``) and each task's generated items, also written as JSONL.

    Args:
        folder: Where the JSONL files go (created if missing).
        heldout_facts: Held-out facts kept (None: all).
        train_per_task: Generated training items per downstream task.
        test_per_task: Test items per downstream task.
        seed: Seeds the generators.

    Returns:
        ``{"facts": {"sft", "heldout"}, "tasks": {task: {"train", "test"}}, "train_files": {"knowledge",
        "downstream"}}``.
    """
    facts = demo_facts()
    facts["heldout"] = facts["heldout"][:heldout_facts]
    tasks = {t: downstream_items(t, train_per_task, test_per_task, seed=seed) for t in TASKS}
    folder = Path(folder)
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
