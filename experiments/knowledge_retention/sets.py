"""The knowledge-retention experiment's data: the fixed knowledge SFT set, the growing downstream SFT sets, and the
fixed evaluation sets. Everything is drawn with fixed seeds from the local copies of the data sets
(``$LORAMOE_DATA_DIR``) and written at run time under the gitignored output folder; nothing from them is committed.

- Knowledge SFT (task type ``knowledge``): 500 WebQuestions trainmodel + 500 NQ-open dev questions, closed-book QA
  (``qa`` format: the question is the user turn, the first gold answer the target). Any question whose normalised
  text is also in an evaluation split is dropped before the draw.
- Downstream SFT (task type ``downstream``): SST-2, AG News, RTE, BoolQ, XSum and Alpaca in equal shares. The sets
  are nested: the 1,000-sample set is the first rows of the 4,000-sample set's per-task order.
- Evaluation: closed-book QA in the same format as the knowledge SFT (WebQuestions test, EfficientQA dev, TREC
  curated-test), the ROME / LAMA ranking probes and the project's ``facts``, and the downstream suites on held-out
  rows; the downstream and probe rows are those of ``experiments/forgetting`` (``mixture.eval_sets``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from evaluator import DOWNSTREAM  # experiments/forgetting/evaluator.py
from mixture import (  # experiments/forgetting/mixture.py: the downstream record formats and eval rows
    DATA,
    INSTR,
    _jsonl,
    _record,
    _tsv,
    downstream_rows,
    eval_item,
    eval_sets,
)

KNOWLEDGE_PER_SOURCE = 500  # WebQuestions trainmodel, NQ-open dev
DOWNSTREAM_TASKS = ["sst2", "agnews", "rte", "boolq", "xsum", "alpaca"]
CBQA = ["webq", "efficientqa", "trec"]  # closed-book QA in the knowledge SFT's format
PROBES = ["rome", "lama", "facts"]
MAX_LENGTH = 96  # tokens per training sample (chat template, prompt and answer)
LABEL_ANSWER_TOKENS = 4  # answer budget of the label tasks when fitting their prompts
XSUM_ANSWER_TOKENS = 40  # a summary's budget (the 90th percentile is 38 tokens); longer ones lose their tail
POOL = 4000  # rows drawn per downstream task; every size takes a prefix


def _norm(question: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", " ".join(question.lower().split())).strip()


def cbqa_eval_rows() -> dict[str, list[dict]]:
    """Every closed-book QA evaluation row (full splits): ``{"prompt", "golds"}``; TREC's gold is a regex."""
    webq = json.loads((DATA / "webquestions" / "test.json").read_text(encoding="utf-8"))
    eqa = _jsonl(DATA / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl")
    trec = _tsv(
        DATA / "trec_factoid_curated" / "curated-test.tsv", False, ["id", "type", "question", "pattern"]
    )
    return {
        "webq": [{"prompt": r["qText"], "golds": r["answers"]} for r in webq],
        "efficientqa": [{"prompt": r["question"], "golds": r["answer"]} for r in eqa],
        "trec": [{"prompt": r["question"], "golds": [r["pattern"]]} for r in trec],
    }


def knowledge_records() -> list[dict]:
    """The fixed knowledge SFT set (qa records), disjoint from every evaluation split by normalised question."""
    from loramoe.demo.items import demo_facts

    facts = demo_facts()
    taken = {_norm(it["prompt"]) for rows in cbqa_eval_rows().values() for it in rows}
    taken |= {_norm(f["question"]) for f in facts["sft"] + facts["heldout"]}
    webq = json.loads((DATA / "webquestions" / "trainmodel.json").read_text(encoding="utf-8"))
    nq = _jsonl(DATA / "nq_open" / "NQ-open.dev.jsonl")
    pools = {
        "webq_train": [{"question": r["qText"], "answers": r["answers"]} for r in webq],
        "nq_dev": [{"question": r["question"], "answers": r["answer"]} for r in nq],
    }
    out = []
    for name, rows in pools.items():
        rows = [r for r in rows if _norm(r["question"]) not in taken and r["answers"]]
        out += random.Random(f"kr:{name}").sample(rows, KNOWLEDGE_PER_SOURCE)
    return out


class Fitter:
    """Cuts a record's input (at a word) so the whole chat-formatted sample fits in ``max_length`` tokens.

    The library cuts an over-long prompt from the left, which would drop the chat template's head and train on a
    format the evaluation never shows; cutting the input text instead keeps the template whole. Evaluation prompts
    get the same cut (with the answer budget of their task), so training and evaluation see the same prompts.
    """

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        from transformers import AutoTokenizer

        from loramoe.models.bundled import resolve_model

        self.tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
        self.max_length = max_length

    def n_prompt(self, prompt: str) -> int:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)  # fmt: skip
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def n_text(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def cut_answer(self, answer: str, budget: int) -> str:
        """The answer's leading words that fit in ``budget`` tokens (EOS included)."""
        words = answer.split()
        lo, hi = 1, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.n_text(" ".join(words[:mid])) + 1 <= budget else (lo, mid - 1)
        return " ".join(words[:lo])

    def prompt(self, instruction: str, text: str, budget: int) -> str:
        """``instruction\ntext`` with ``text`` cut to its leading words so the prompt has at most ``budget`` tokens."""
        join = (lambda t: f"{instruction}\n{t}") if text else (lambda t: instruction)
        if self.n_prompt(join(text)) <= budget:
            return join(text)
        words = text.split()
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.n_prompt(join(" ".join(words[:mid]))) <= budget else (lo, mid - 1)
        return join(" ".join(words[:lo]))


def answer_budget(task: str) -> int:
    """Tokens kept for the answer (EOS included) when fitting a prompt: label words are short, summaries are not."""
    return {"xsum": XSUM_ANSWER_TOKENS, "alpaca": MAX_LENGTH // 2}.get(task, LABEL_ANSWER_TOKENS)


def _alpaca_rows() -> list[dict]:
    rows = json.loads((DATA / "alpaca_5000" / "alpaca_5000.json").read_text(encoding="utf-8"))
    return [r for r in rows if r["output"].strip() and r["instruction"].strip()]


def downstream_records(
    size: int, fitter: Fitter | None = None, shares: dict[str, int] | None = None
) -> list[dict]:
    """``size`` downstream SFT records (alpaca format, the input already in the prompt), equal shares of the six
    tasks unless ``shares`` gives each task's count, each fitted to ``MAX_LENGTH`` tokens; nested across sizes (a
    smaller set is a prefix of each task's order)."""
    fitter = fitter or Fitter()
    if shares is not None and (set(shares) != set(DOWNSTREAM_TASKS) or sum(shares.values()) != size):
        raise SystemExit(
            f"downstream shares must give each of {DOWNSTREAM_TASKS} and sum to {size}: {shares}"
        )
    out = []
    for i, task in enumerate(DOWNSTREAM_TASKS):
        if shares is not None:
            n = shares[task]
        else:
            n = size // len(DOWNSTREAM_TASKS) + (i < size % len(DOWNSTREAM_TASKS))
        if task == "alpaca":
            rows = random.Random("kr:alpaca").sample(_alpaca_rows(), POOL)
            pairs = [(r["instruction"].strip(), r["input"].strip(), r["output"].strip()) for r in rows]
        else:
            rows = downstream_rows(task, "train")
            rows = random.Random(f"kr:{task}").sample(rows, min(POOL, len(rows)))
            pairs = [(INSTR[task], *_record(task, row)) for row in rows]
        if n > len(pairs):
            raise SystemExit(f"{task}: {n} SFT rows asked, the train split has {len(pairs)}")
        for instruction, text, answer in pairs[:n]:
            prompt = fitter.prompt(instruction, text, MAX_LENGTH - answer_budget(task))
            answer = fitter.cut_answer(answer, MAX_LENGTH - fitter.n_prompt(prompt))
            out.append({"instruction": prompt, "input": "", "output": answer})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path


def sft_sources(folder: Path, downstream: int, shares: dict[str, int] | None = None) -> list[dict]:
    """The run config's ``data.sources``: the knowledge set, and the downstream set when ``downstream`` > 0 (equal
    shares of the tasks, or ``shares``)."""
    know = folder / "knowledge.jsonl"
    if not know.exists():
        write_jsonl(know, knowledge_records())
    sources = [{"path": str(know), "name": "knowledge", "format": "qa", "task_type": "knowledge"}]
    if downstream:
        tag = (
            ""
            if shares is None
            else "_" + hashlib.sha256(json.dumps(shares, sort_keys=True).encode()).hexdigest()[:8]
        )
        down = folder / f"downstream_{downstream}{tag}.jsonl"
        if not down.exists():
            write_jsonl(down, downstream_records(downstream, shares=shares))
        sources.append(
            {"path": str(down), "name": "downstream", "format": "alpaca", "task_type": "downstream"}
        )
    return sources


def evaluation_sets(n: dict[str, int]) -> dict[str, list[dict]]:
    """Fixed evaluation sets, ``n[suite]`` items each (the first of a seeded shuffle of the split): the CBQA suites,
    ROME / LAMA / facts as ``experiments/forgetting`` draws them, and the downstream suites on held-out rows with
    their prompts fitted as in training."""
    rows = cbqa_eval_rows()
    sets = {}
    for suite in CBQA:
        sets[suite] = _prefix(rows[suite], n[suite], f"kr:eval:{suite}")
    probes = eval_sets(
        {"trec": 1, "efficientqa": 1, **{s: n[s] for s in PROBES}, **dict.fromkeys(DOWNSTREAM, 1)}
    )
    sets.update({s: probes[s] for s in PROBES})
    fitter = Fitter()
    for task in DOWNSTREAM:
        budget = MAX_LENGTH - answer_budget(task)
        rows = _prefix(downstream_rows(task, "eval"), n[task], f"kr:eval:{task}")
        sets[task] = [
            eval_item(
                task, row, lambda text, task=task, budget=budget: fitter.prompt(INSTR[task], text, budget)
            )
            for row in rows
        ]
    return sets


def _prefix(rows: list, n: int, seed: str) -> list:
    """The first ``n`` rows of a seeded shuffle: a smaller set is a prefix of a larger one, so a later session may
    shrink a suite and still compare it item by item with the committed per-item values."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def fingerprint(items: list[dict]) -> str:
    """A short hash of an evaluation set, stored with every score (a later session checks it draws the same set)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:12]
