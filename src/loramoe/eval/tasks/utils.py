"""Document preparation and scoring functions referenced by the task YAMLs (``!function utils.<name>``).

lm-eval resolves ``!function utils.x`` to a ``utils.py`` next to the YAML; :func:`loramoe.eval.tasks.task_dir` writes
a one-line shim there that re-exports this module, so there is one copy of the code.

Design decisions:

- Every eval split is disjoint from what SFT may use; the row ranges are the constants below and are listed in
  ``docs/evaluation.md``. BoolQ and XSum ship one file each, so their *last* rows are held out.
- Distractors for the log-likelihood ranking probes are objects of the same relation, chosen by a
  ``random.Random`` seeded with a string (stable across processes and ``PYTHONHASHSEED``), so every run and every
  model sees the same choices.
- A generation is scored on its first non-empty line: an answer, a completion or a summary is one line, and what
  a model adds after it (a new "Question:", an explanation) is not part of the answer.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from loramoe.eval.metrics import (
    alias_contained,
    exact_match,
    first_line,
    normalize_answer,
    prefix_match,
    rank_of_gold,
    regex_match,
    rouge_l,
    token_f1,
)

BOOLQ_EVAL_ROWS = 1000
"""The last 1,000 rows of ``boolq/dev.jsonl`` are eval-only; rows ``[0, len - 1000)`` may be used for SFT."""

XSUM_EVAL_ROWS = 200
"""The last 200 rows of ``xsum_1k/test.jsonl`` are eval-only; the first 800 may be used for SFT."""

XSUM_MAX_CHARS = 1500
"""XSum articles are cut to this many characters (about 330 tokens), at a word boundary, to keep CPU runs short."""

NUM_DISTRACTORS = 4
"""Ranking probes score the gold object against this many other objects of the same relation (chance = 1/5)."""

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]

LAMA_SEED = "loramoe-lama"

LAMA_MAX_ROWS = 5000
"""LAMA probes use the first 5,000 facts after one seeded shuffle (of 27,610 with a template); distractors come
from all facts of the relation."""

# --------------------------------------------------------------------------------------------------------------
# Document preparation (``process_docs`` / ``custom_dataset``)


def docs_webquestions(dataset: Any) -> Any:
    """WebQuestions: ``qText`` -> ``question``, ``answers`` -> ``golds``."""
    return dataset.map(lambda d: {"question": d["qText"], "golds": list(d["answers"])})


def docs_nq_open(dataset: Any) -> Any:
    """NQ-open: ``answer`` (a list of aliases) -> ``golds``."""
    return dataset.map(lambda d: {"golds": list(d["answer"])})


def _with_distractors(
    rows: list[dict], *, gold_key: str, group_key: str, seed: str, pool_rows: list[dict] | None = None
) -> list[dict]:
    """Add ``choices`` (gold + ``NUM_DISTRACTORS`` same-relation objects) and ``gold`` (its index) to each row.

    Distractors are drawn from the objects of ``pool_rows`` (default ``rows``). Rows whose relation has fewer
    than ``NUM_DISTRACTORS`` other distinct objects are dropped.
    """
    spellings: dict[str, dict[str, str]] = {}  # relation -> normalised object -> first spelling seen
    for row in rows if pool_rows is None else pool_rows:
        spellings.setdefault(row[group_key], {}).setdefault(normalize_answer(row[gold_key]), row[gold_key])
    pools = {rel: sorted(objs.values()) for rel, objs in spellings.items()}
    out = []
    for i, row in enumerate(rows):
        gold = row[gold_key]
        norm = normalize_answer(gold)
        pool = pools[row[group_key]]
        rng = random.Random(f"{seed}:{i}:{gold}")
        # Draw one extra so that dropping the gold (when drawn) still leaves enough: O(k) per row, not O(pool).
        drawn = rng.sample(pool, min(len(pool), NUM_DISTRACTORS + 1))
        choices = [c for c in drawn if normalize_answer(c) != norm][:NUM_DISTRACTORS]
        if len(choices) < NUM_DISTRACTORS:
            continue
        pos = rng.randrange(NUM_DISTRACTORS + 1)
        choices.insert(pos, gold)
        out.append({**row, "choices": choices, "gold": pos})
    return out


def load_rome(data_dir: str, **_: Any) -> dict[str, Any]:
    """``custom_dataset`` for ROME known_1000: cloze ``prompt``, ``golds`` = [attribute], ranking choices.

    ROME has few distinct objects per relation (three religions, four continents), so the distractor pool of a
    relation is its ROME objects plus the LAMA T-REx objects of the same Wikidata relation; no fact is dropped.

    Args:
        data_dir: The data directory (holding ``rome_known_1000/`` and ``lama_trex_pararel/``).
        **_: lm-eval passes the task metadata here as well; ignored.

    Returns:
        ``{"test": datasets.Dataset}`` with ``prompt``, ``golds``, ``suffix`` (empty), ``choices``, ``gold``.
    """
    from datasets import Dataset

    root = Path(data_dir)
    with (root / "rome_known_1000" / "known_1000.json").open(encoding="utf-8") as f:
        facts = json.load(f)
    rows = [
        {
            "known_id": int(d["known_id"]),
            "prompt": d["prompt"],
            "object": d["attribute"],
            "relation_id": d["relation_id"],
        }
        for d in facts
    ]
    pool = list(rows)
    for relation in sorted({r["relation_id"] for r in rows}):
        lama_file = root / "lama_trex_pararel" / "trex_lms_vocab" / f"{relation}.jsonl"
        if lama_file.exists():
            with lama_file.open(encoding="utf-8") as f:
                pool += [
                    {"relation_id": relation, "object": json.loads(line)["obj_label"]}
                    for line in f
                    if line.strip()
                ]
    kept = _with_distractors(
        rows, gold_key="object", group_key="relation_id", seed="loramoe-rome", pool_rows=pool
    )
    return {"test": Dataset.from_list([{**r, "golds": [r["object"]], "suffix": ""} for r in kept])}


def load_lama(data_dir: str, **_: Any) -> dict[str, Any]:
    """``custom_dataset`` for LAMA T-REx: join facts with each relation's *first* ParaRel template.

    The cloze prompt is the template text before ``[Y]`` (with ``[X]`` filled); whatever follows ``[Y]`` is kept
    as ``suffix`` and appended to every ranking choice, so templates like "[X] is a [Y] by profession." are scored
    as whole sentences. Relations without a pattern file (P31, P527) are skipped. Rows are shuffled once with a
    fixed seed, because the files are grouped by relation and ``limit`` takes the first rows, and the first
    :data:`LAMA_MAX_ROWS` are kept.

    Args:
        data_dir: The ``lama_trex_pararel`` folder.
        **_: lm-eval passes the task metadata here as well; ignored.

    Returns:
        ``{"test": datasets.Dataset}`` with ``prompt``, ``golds``, ``suffix``, ``choices``, ``gold``, ``relation_id``.
    """
    from datasets import Dataset

    root = Path(data_dir)
    rows: list[dict] = []
    for pattern_file in sorted((root / "patterns").glob("P*.jsonl")):
        relation = pattern_file.stem
        fact_file = root / "trex_lms_vocab" / f"{relation}.jsonl"
        if not fact_file.exists():
            continue
        with pattern_file.open(encoding="utf-8") as f:
            template = json.loads(f.readline())["pattern"]
        template = re.sub(r"\s+([.,])", r"\1", template).strip()  # "[X] is located in [Y] ." -> "... [Y]."
        before, _sep, after = template.partition("[Y]")
        with fact_file.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    fact = json.loads(line)
                    rows.append(
                        {
                            "relation_id": relation,
                            "subject": fact["sub_label"],
                            "object": fact["obj_label"],
                            "prompt": before.replace("[X]", fact["sub_label"]).rstrip(),
                            "suffix": after.replace("[X]", fact["sub_label"]),
                        }
                    )
    random.Random(LAMA_SEED).shuffle(rows)
    kept = _with_distractors(
        rows[:LAMA_MAX_ROWS], gold_key="object", group_key="relation_id", seed=LAMA_SEED, pool_rows=rows
    )
    return {"test": Dataset.from_list([{**r, "golds": [r["object"]]} for r in kept])}


def docs_rank_choices(doc: dict) -> list[str]:
    """``doc_to_choice`` for the ranking probes: each candidate object followed by the template's suffix."""
    return [c + doc["suffix"] for c in doc["choices"]]


def docs_sst2(dataset: Any) -> Any:
    """SST-2: the label column is already 0 = negative / 1 = positive; copy it to ``gold``."""
    return dataset.map(lambda d: {"gold": int(d["label"])})


def docs_rte(dataset: Any) -> Any:
    """RTE: ``entailment`` -> 0 ("yes"), ``not_entailment`` -> 1 ("no")."""
    return dataset.map(lambda d: {"gold": 0 if d["label"] == "entailment" else 1})


def docs_boolq(dataset: Any) -> Any:
    """BoolQ: keep the eval-only last :data:`BOOLQ_EVAL_ROWS` rows; ``"True"`` -> 1 ("yes")."""
    start = max(0, len(dataset) - BOOLQ_EVAL_ROWS)
    held_out = dataset.select(range(start, len(dataset)))
    return held_out.map(lambda d: {"gold": int(str(d["answer"]) == "True")})


_CP1252 = {145: "'", 146: "'", 147: '"', 148: '"', 150: "-", 151: "-"}  # Windows codes the corpus also uses


def _clean_ag_text(text: str) -> str:
    # AG News keeps HTML-escape artefacts (" #39;" for an apostrophe) and literal backslashes for newlines.
    text = re.sub(r" ?#39;", "'", text)  # "it #39;s" -> "it's"
    text = re.sub(r"#(\d+);", lambda m: _CP1252.get(int(m.group(1)), chr(int(m.group(1)))), text)  # #36; -> $
    return " ".join(text.replace("\\", " ").split())


def docs_ag_news(dataset: Any) -> Any:
    """AG News: clean escape artefacts; label name -> index into :data:`AG_NEWS_LABELS`."""
    return dataset.map(
        lambda d: {"text": _clean_ag_text(d["text"]), "gold": AG_NEWS_LABELS.index(d["label"])}
    )


def _truncate_words(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0]


def docs_xsum(dataset: Any) -> Any:
    """XSum: keep the eval-only last :data:`XSUM_EVAL_ROWS` rows; cut articles to :data:`XSUM_MAX_CHARS`."""
    start = max(0, len(dataset) - XSUM_EVAL_ROWS)
    held_out = dataset.select(range(start, len(dataset)))
    return held_out.map(
        lambda d: {"document": _truncate_words(" ".join(d["document"].split()), XSUM_MAX_CHARS)}
    )


# --------------------------------------------------------------------------------------------------------------
# Scoring (``process_results``): one dict of per-document scores, averaged by lm-eval (aggregation: mean)


def results_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """Closed-book QA: normalised exact match, token F1 and alias containment over ``doc["golds"]``."""
    answer = first_line(results[0])
    golds = doc["golds"]
    return {
        "em": exact_match(answer, golds),
        "f1": token_f1(answer, golds),
        "contains": alias_contained(answer, golds),
    }


def results_trec(doc: dict, results: list[str]) -> dict[str, float]:
    """TREC factoid: the answer regex (``doc["pattern"]``) searched in the raw answer, case-insensitively."""
    return {"regex": regex_match(first_line(results[0]), doc["pattern"])}


def results_cloze(doc: dict, results: list[str]) -> dict[str, float]:
    """Cloze fact probe by generation: the continuation starts with / contains the gold object."""
    answer = first_line(results[0])
    return {"prefix": prefix_match(answer, doc["golds"]), "contains": alias_contained(answer, doc["golds"])}


def results_rank(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """Log-likelihood ranking: accuracy (gold strictly best) and reciprocal rank of the gold choice."""
    logliks = [float(ll) for ll, _is_greedy in results]
    rank = rank_of_gold(logliks, int(doc["gold"]))
    return {"acc": float(rank == 1), "mrr": 1.0 / rank}


def results_rouge(doc: dict, results: list[str]) -> dict[str, float]:
    """Summarisation: ROUGE-L F-measure (with stemming) of the first line against ``doc["summary"]``."""
    return {"rougeL": rouge_l(first_line(results[0]), doc["summary"])}
