"""The forgetting experiment's evaluation: which suite is scored how (``loramoe.eval.engine`` does the scoring).

Prompts are wrapped in the model's chat template, as ``loramoe.data`` formats the SFT records, except the ROME /
LAMA ranking probes, which score plain-text cloze continuations (format-free knowledge probes). Generation is greedy
(16 new tokens, 32 for XSum); a choice suite is scored by the summed log-likelihood of each choice (lm-eval's acc).
"""

from __future__ import annotations

import logging
from typing import Any

from loramoe.eval.engine import Task, predict_choices, score_item_sets

KNOWLEDGE = ["trec", "efficientqa", "rome", "lama", "facts"]  # suites NOT in the SFT mixture
DOWNSTREAM = ["sst2", "rte", "boolq", "agnews", "xsum"]
MAX_NEW_TOKENS = 16
XSUM_NEW_TOKENS = 32

TASKS = {
    "trec": Task("regex", max_new_tokens=MAX_NEW_TOKENS),
    "efficientqa": Task("contains", max_new_tokens=MAX_NEW_TOKENS),
    "facts": Task("contains", max_new_tokens=MAX_NEW_TOKENS),
    "xsum": Task("rougeL", max_new_tokens=XSUM_NEW_TOKENS),
    "rome": Task("acc", chat_template=False),
    "lama": Task("acc", chat_template=False),
    **{task: Task("acc") for task in ("sst2", "rte", "boolq", "agnews")},
}

log = logging.getLogger("forgetting")


def evaluate(model: Any, tok: Any, sets: dict[str, list[dict]]) -> dict[str, Any]:
    """Score every suite of ``sets`` (one engine call per suite, so the log shows progress).

    Returns:
        ``scores`` and ``seconds`` per suite, ``stderr`` per suite (None for one item), ``samples`` (three prompt
        tails and outputs per generation suite) and ``pred_dist`` (how often each choice was predicted, per
        downstream choice suite).
    """
    model.eval()
    out: dict[str, Any] = {"scores": {}, "seconds": {}, "stderr": {}, "samples": {}}
    for task, items in sets.items():
        res = score_item_sets(model, tok, {task: items}, TASKS, batch_size=16)[task]
        out["scores"][task] = res.score
        out["seconds"][task] = round(res.seconds, 1)
        out["stderr"][task] = res.interval["stderr"]
        if not TASKS[task].by_choice:
            out["samples"][task] = [[it["prompt"][-80:], p] for it, p in zip(items[:3], res.predictions[:3])]
        elif task in DOWNSTREAM:
            counts = [res.predictions.count(k) for k in range(len(items[0]["choices"]))]
            out.setdefault("pred_dist", {})[task] = counts
        log.info("  %-12s %.3f  (%.0fs)", task, res.score, res.seconds)
    return out


def _choice_scores(model: Any, tok: Any, items: list[dict], chat: bool, batch: int = 16) -> list[int]:
    """The predicted choice per item: ``loramoe.eval.engine.predict_choices`` under the name that
    ``experiments/knowledge_retention/scoring.py`` imports (new code should call the engine directly)."""
    return predict_choices(model, tok, items, chat, batch_size=batch)
