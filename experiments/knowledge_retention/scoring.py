"""Scoring for the knowledge-retention experiment: every suite's score with its 95 % interval and per-item values.

``score_sets`` is the one place the driver evaluates a model. It scores with the package's evaluation engine
(``loramoe.eval.engine``) and ``experiments/forgetting``'s task table (the same generation settings, metrics and
log-likelihood ranking as round 1), and keeps each item's value, so intervals and paired comparisons between runs
can be computed later from the committed results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from evaluator import MAX_NEW_TOKENS, TASKS  # experiments/forgetting/evaluator.py: round 1's task table
from sets import CBQA

from loramoe.eval.metrics import Z95, mean_interval, wilson_interval

log = logging.getLogger("knowledge_retention")

# WebQuestions test is scored like EfficientQA: a gold alias contained in the generated answer
SUITES = {**TASKS, "webq": TASKS["efficientqa"]}
assert SUITES["webq"].max_new_tokens == MAX_NEW_TOKENS
# label words under the chat template; rome / lama: plain cloze
CHAT_RANKED = {"sst2", "rte", "boolq", "agnews"}


def encode_values(values: Sequence[float], binary: bool) -> str | list[float]:
    """Per-item values, compact for JSON: a 0/1 string for accuracies, rounded floats otherwise."""
    return "".join("1" if v else "0" for v in values) if binary else [round(v, 4) for v in values]


def decode_values(stored: str | list[float]) -> list[float]:
    return [float(c) for c in stored] if isinstance(stored, str) else list(stored)


def summary(values: Sequence[float], binary: bool) -> dict[str, Any]:
    n = len(values)
    score = sum(values) / n
    if binary:
        lo, hi = wilson_interval(sum(values), n)
    else:  # a continuous score (ROUGE-L): the normal interval, (score, score) for a single item
        stderr = mean_interval(values)["stderr"] or 0.0
        lo, hi = score - Z95 * stderr, score + Z95 * stderr
    return {"score": score, "n": n, "lo": lo, "hi": hi, "values": encode_values(values, binary)}


def paired_bootstrap(stat, columns: Sequence[Sequence[float]], *, draws: int = 2000, seed: int = 0) -> dict:
    """``stat`` of the columns' means (runs scored on the same items), with a 95 % interval from resampling the
    items jointly across the columns, so what the runs share (how hard an item is) cancels out of the interval.
    ``stat`` takes one mean per column and works elementwise (it is applied to arrays of resampled means)."""
    import numpy as np

    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"paired items differ in number: {sorted(lengths)}")
    cols = np.asarray(columns, dtype=float)
    idx = np.random.default_rng(seed).integers(0, cols.shape[1], size=(draws, cols.shape[1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(stat(*cols.mean(axis=1)))
        stats = np.asarray(stat(*[c[idx].mean(axis=1) for c in cols]), dtype=float)
    stats = stats[np.isfinite(stats)]
    if len(stats) < draws * 0.9:  # a ratio whose denominator is often zero: no interval
        return {"value": value, "lo": float("nan"), "hi": float("nan")}
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"value": value, "lo": float(lo), "hi": float(hi)}


def paired_ratio(num: Sequence[float], den: Sequence[float], *, draws: int = 2000, seed: int = 0) -> dict:
    """Ratio of two runs' means on the same items, with a 95 % paired-bootstrap interval (items resampled)."""
    r = paired_bootstrap(lambda a, b: a / b, [num, den], draws=draws, seed=seed)
    return {"ratio": r["value"], "lo": r["lo"], "hi": r["hi"]}


def score_sets(model, tok, sets: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Score ``model`` on every suite of ``sets``: suite -> score, n, 95 % interval, per-item values, seconds."""
    from loramoe.eval.engine import score_item_sets

    model.eval()
    out: dict[str, dict[str, Any]] = {}
    for suite, items in sets.items():
        res = score_item_sets(model, tok, {suite: items}, SUITES, batch_size=16)[suite]
        extra: dict[str, Any] = {}
        if not SUITES[suite].by_choice:
            extra["examples"] = [[it["prompt"][-80:], p] for it, p in zip(items[:3], res.predictions[:3])]
        elif suite in CHAT_RANKED:
            extra["pred_dist"] = [res.predictions.count(k) for k in range(len(items[0]["choices"]))]
        out[suite] = {
            **summary(res.values, binary=suite != "xsum"),
            **extra,
            "seconds": round(res.seconds, 1),
        }
        r = out[suite]
        log.info(
            "  %-12s %.3f [%.3f, %.3f] n=%d (%.0fs)",
            suite,
            r["score"],
            r["lo"],
            r["hi"],
            r["n"],
            r["seconds"],
        )
    return out


def routing_masses(model, tok, sets: dict[str, list[dict]], per_suite: int = 48) -> dict[str, Any]:
    """Mean router mass on each expert group, per eval suite (prompt + reference answer, as in training) and per
    sample type (the CBQA suites are ``knowledge``, the downstream suites ``downstream``)."""
    from loramoe.analysis.report import expert_usage, summarize
    from loramoe.data.formats import Example
    from loramoe.inject import get_config

    cfg = get_config(model)
    usage, types = {}, {}
    for suite in [*CBQA, "sst2", "rte", "boolq", "agnews", "xsum"]:
        items = sets[suite][:per_suite]
        examples = [
            Example(prompt=it["prompt"], answer=str(it["choices"][it["gold"]] if "choices" in it else it["golds"][0]),
                    task_type=1 if suite in CBQA else 0, source=suite)
            for it in items
        ]  # fmt: skip
        usage[suite], types[suite] = expert_usage(
            model, tok, examples, template="chat", max_length=96, progress=False
        )
    report = summarize(usage, types, group_of_expert=cfg.group_of_expert(), task_names=cfg.task_names)
    return {
        "suites": {s: v["group_mass"] for s, v in report["tasks"].items()},
        "types": {t: v["group_mass"] for t, v in report["task_types"].items()},
    }
