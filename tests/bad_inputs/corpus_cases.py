"""The bad-input corpus's case registry, shared by its generators (``corpus_data``, ``corpus_configs``,
``corpus_adapters``) and by ``make_corpus.py``, which runs them: where the generated files go, the good run config
that each config case changes in one place, good records of each format, and ``case``, which records one manifest
entry (``make_corpus.py`` describes its fields).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "generated"
REL = "corpus/generated"  # how the workspace reaches OUT

BASE_CONFIG: dict[str, Any] = {
    "model": "base",
    "loramoe": {"num_experts": 2, "rank": 2},
    "data": {"sources": [{"path": "good.jsonl"}], "max_length": 64},
    "training": {
        "output_dir": "out",
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    },
}

GOOD = {
    "alpaca": [
        {"instruction": "Say hi", "output": "hi", "task_type": "downstream"},
        {"instruction": "Capital of France?", "input": "", "output": "Paris", "task_type": 1},
    ],
    "qa": [{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "task_type": "knowledge"}],
    "prompt_completion": [{"prompt": "2+2=", "completion": "4", "task_type": 0}],
    "messages": [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "task_type": 0,
        }
    ],
}

cases: list[dict[str, Any]] = []


def case(id_: str, error: str, match: str, **run: Any) -> None:
    """``run``: config/overrides or adapter/model; ``names``: what the message must name (default: the file);
    ``known_bug``: why the case fails today (the test expects the failure until the fix lands)."""
    cases.append({"id": id_, **run, "error": error, "match": match})


KNOWN_BUGS: dict[str, str] = {}  # case id -> why it fails today (xfail until fixed)


def write_config(name: str, config: Any, *, raw: str | None = None) -> str:
    path = OUT / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else yaml.safe_dump(config, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return f"{REL}/configs/{name}.yaml"


def with_value(dotted: str, value: Any) -> dict[str, Any]:
    """BASE_CONFIG with ``dotted`` (``data.sources.0.path``) set to ``value`` (``...`` deletes it)."""
    config = copy.deepcopy(BASE_CONFIG)
    node: Any = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config
