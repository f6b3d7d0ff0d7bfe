"""The forgetting experiment's data: the SFT mixture (converted from ``../shared/data`` at run time into the
gitignored run directory; nothing is committed) and the fixed, seeded evaluation sets. Used by ``run.py``.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from evaluator import DOWNSTREAM

REPO = Path(__file__).resolve().parents[2]
# the local copies of the public data sets (each folder's SOURCE.md names its origin); launch.sh sets it
DATA = Path(os.environ.get("LORAMOE_DATA_DIR") or REPO / ".." / "shared" / "data").resolve()
PASSAGE_CHARS = 300  # BoolQ passages, AG News and XSum articles cut to this (train and eval alike)


SST2_LABELS = ["negative", "positive"]
AG_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
YES_NO = ["no", "yes"]

INSTR = {
    "sst2": "Classify the sentiment of this sentence as positive or negative.",
    "agnews": "Classify the topic of this news article as World, Sports, Business or Sci/Tech.",
    "rte": "Does the premise entail the hypothesis? Answer yes or no.",
    "boolq": "Answer the question about the passage with yes or no.",
    "xsum": "Summarize the article in one sentence.",
}


def _cut(text: str, n: int = PASSAGE_CHARS) -> str:
    from loramoe.eval.tasks.utils import _truncate_words

    return _truncate_words(" ".join(text.split()), n)


def _tsv(path: Path, header: bool, names: list[str] | None = None) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if header:
        names, rows = rows[0], rows[1:]
    return [dict(zip(names, r, strict=False)) for r in rows if r]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _record(task: str, row: dict) -> tuple[str, str]:
    """(input text, gold label/answer) of one downstream row, in the same format for training and eval."""
    from loramoe.eval.tasks.utils import _clean_ag_text

    if task == "sst2":
        return row["sentence"].strip(), SST2_LABELS[int(row["label"])]
    if task == "agnews":
        return _cut(_clean_ag_text(row["text"])), row["label"]
    if task == "rte":
        gold = "yes" if row["label"] == "entailment" else "no"
        return f"Premise: {row['sentence1']}\nHypothesis: {row['sentence2']}", gold
    if task == "boolq":
        gold = "yes" if str(row["answer"]) == "True" else "no"
        return f"Passage: {_cut(row['passage'])}\nQuestion: {row['question']}?", gold
    if task == "xsum":
        return f"Article: {_cut(row['document'])}", row["summary"].strip()
    raise ValueError(task)


def downstream_rows(task: str, split: str) -> list[dict]:
    """SFT ("train") or eval ("eval") rows; the two are disjoint for every task (see README)."""
    from loramoe.eval.tasks.utils import BOOLQ_EVAL_ROWS, XSUM_EVAL_ROWS

    if task == "sst2":
        f = "train_full.tsv" if split == "train" else "dev.tsv"
        return _tsv(DATA / "sst2" / f, header=True)
    if task == "agnews":
        f = "dev.tsv" if split == "train" else "test.tsv"
        return _tsv(DATA / "ag_news" / f, header=False, names=["text", "label"])
    if task == "rte":
        f = "train.tsv" if split == "train" else "dev.tsv"
        return _tsv(DATA / "rte" / f, header=True)
    if task == "boolq":
        rows = _jsonl(DATA / "boolq" / "dev.jsonl")
        cut = len(rows) - BOOLQ_EVAL_ROWS
        return rows[:cut] if split == "train" else rows[cut:]
    if task == "xsum":
        rows = _jsonl(DATA / "xsum_1k" / "test.jsonl")
        cut = len(rows) - XSUM_EVAL_ROWS
        return rows[:cut] if split == "train" else rows[cut:]
    raise ValueError(task)


def prepare_sft_data(folder: Path, pool: int = 1000) -> dict[str, Path]:
    """Write each downstream source as alpaca JSONL (a seeded pool of rows); returns name -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in ["sst2", "agnews", "rte", "boolq", "xsum"]:
        path = folder / f"{task}.jsonl"
        files[task] = path
        if path.exists():
            continue
        rows = downstream_rows(task, "train")
        rows = random.Random(f"sft:{task}").sample(rows, min(pool, len(rows)))
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                text, gold = _record(task, row)
                f.write(json.dumps({"instruction": INSTR[task], "input": text, "output": gold}) + "\n")
    return files


def sft_sources(files: dict[str, Path]) -> list[dict]:
    """The mixture: 8 sources, equal shares (6 downstream = 75 %, 2 closed-book QA = 25 %)."""
    share = 1.0 / 8
    down = [
        {"path": str(files[t]), "name": t, "format": "alpaca"}
        for t in ["sst2", "agnews", "rte", "boolq", "xsum"]
    ]
    down.append(
        {"path": str(DATA / "alpaca_5000" / "alpaca_5000.json"), "name": "alpaca", "skip_invalid": True}
    )
    know = [
        {"path": str(DATA / "nq_open" / "NQ-open.dev.jsonl"), "name": "nq_dev", "format": "qa"},
        {
            "path": str(DATA / "webquestions" / "trainmodel.json"),
            "name": "webq_train",
            "format": "qa",
            "columns": {"question": "qText"},
        },
    ]
    for s in down:
        s.update(task_type="downstream", ratio=share)
    for s in know:
        s.update(task_type="knowledge", ratio=share)
    return down + know


def eval_sets(n: dict[str, int]) -> dict[str, list[dict]]:
    """Fixed, seeded eval subsets (identical for every checkpoint)."""
    from loramoe.demo.items import demo_facts
    from loramoe.eval.tasks.utils import load_lama, load_rome

    sets: dict[str, list[dict]] = {}
    trec = _tsv(
        DATA / "trec_factoid_curated" / "curated-test.tsv", False, ["id", "type", "question", "pattern"]
    )
    sets["trec"] = [{"prompt": r["question"], "golds": [r["pattern"]]} for r in trec[: n["trec"]]]
    eqa = _jsonl(DATA / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl")
    sets["efficientqa"] = [{"prompt": r["question"], "golds": r["answer"]} for r in eqa[: n["efficientqa"]]]
    # the project's own world facts (the demo's, SFT and held-out alike: none is in this mixture), which the base
    # model mostly knows; they show whether SFT breaks answering simple facts in chat
    facts = demo_facts()
    facts = (facts["sft"] + facts["heldout"])[: n["facts"]]
    sets["facts"] = [{"prompt": f["question"], "golds": f["answers"]} for f in facts]
    rome = list(load_rome(str(DATA))["test"])
    rome = random.Random("forgetting:rome").sample(rome, n["rome"])
    lama = list(load_lama(str(DATA / "lama_trex_pararel"))["test"])[: n["lama"]]
    for name, rows in (("rome", rome), ("lama", lama)):
        sets[name] = [
            {"prompt": r["prompt"], "choices": [c + r["suffix"] for c in r["choices"]], "gold": r["gold"]}
            for r in rows
        ]
    for task in DOWNSTREAM:
        rows = random.Random(f"forgetting:{task}").sample(downstream_rows(task, "eval"), n[task])
        sets[task] = [eval_item(task, row) for row in rows]
    return sets


def eval_item(task: str, row: dict, prompt: Callable[[str], str] | None = None) -> dict:
    """One downstream eval item of a held-out row: the prompt (by default the instruction and the input, as in SFT;
    ``prompt`` maps the input text to another) and the gold summary (XSum) or the label choices and gold index."""
    text, gold = _record(task, row)
    item: dict = {"prompt": prompt(text) if prompt else f"{INSTR[task]}\n{text}"}
    if task == "xsum":
        item["golds"] = [gold]
    else:
        labels = {"sst2": SST2_LABELS, "agnews": AG_LABELS, "rte": YES_NO, "boolq": YES_NO}[task]
        item["choices"], item["gold"] = labels, labels.index(gold)
    return item
