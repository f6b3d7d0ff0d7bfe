"""The lm-eval task files: templating of the data directory, held-out splits, distractors, scoring hooks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from loramoe.errors import ConfigError, DataError
from loramoe.eval.metrics import normalize_answer
from loramoe.eval.tasks import (
    DATA_DIR_ENV,
    SUITES,
    TASKS,
    check_data,
    expand_tasks,
    resolve_data_dir,
    task_dir,
)
from loramoe.eval.tasks import utils as tu

datasets = pytest.importorskip("datasets")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)


def test_yaml_task_names_match_the_task_table(tmp_path: Path) -> None:
    out = task_dir(tmp_path, out_dir=tmp_path / "tasks")
    configs = {p.stem: _load(p) for p in out.glob("*.yaml")}
    assert {c["task"] for c in configs.values()} == set(TASKS)
    for name, cfg in configs.items():
        assert cfg["task"] == name
        assert f"loramoe_{TASKS[name].suite}" in cfg["tag"]
        assert (cfg["output_type"] == "generate_until") == TASKS[name].generative
        metric_names = [m["metric"] for m in cfg["metric_list"]]
        assert TASKS[name].metric in metric_names
    assert (out / "utils.py").read_text().startswith("from loramoe.eval.tasks.utils import *")


def test_task_dir_substitutes_an_awkward_data_dir(tmp_path: Path) -> None:
    data = tmp_path / 'my "data" dir'
    data.mkdir()
    out = task_dir(data, out_dir=tmp_path / "tasks")
    webq = _load(out / "loramoe_webq.yaml")
    assert (
        webq["dataset_kwargs"]["data_files"]["test"] == f"{data.resolve().as_posix()}/webquestions/test.json"
    )
    lama = _load(out / "loramoe_lama_rank.yaml")
    assert lama["dataset_kwargs"]["data_dir"] == f"{data.resolve().as_posix()}/lama_trex_pararel"
    assert "@DATA_DIR@" not in "".join(p.read_text() for p in out.glob("*.yaml"))


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    explicit = tmp_path / "x"
    explicit.mkdir()
    assert resolve_data_dir(explicit) == explicit.resolve()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=DATA_DIR_ENV):
        resolve_data_dir()
    # With neither, the pinned sources are used: tests/unit/test_task_sources.py.


def test_check_data_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "sst2" / "dev.tsv"))):
        check_data(["loramoe_sst2"], tmp_path)


def test_expand_tasks_accepts_suites_and_short_names() -> None:
    assert expand_tasks(["knowledge"]) == SUITES["knowledge"]
    assert expand_tasks(["sst2", "loramoe_sst2", "downstream"])[0] == "loramoe_sst2"
    assert len(expand_tasks(["all", "webq"])) == len(TASKS)
    with pytest.raises(ConfigError, match="suites: knowledge"):
        expand_tasks(["mmlu"])


def test_boolq_eval_rows_are_the_last_thousand() -> None:
    ds = datasets.Dataset.from_list(
        [{"question": f"q{i}", "passage": "p", "title": "t", "answer": str(i % 2 == 0)} for i in range(1005)]
    )
    held_out = tu.docs_boolq(ds)
    assert len(held_out) == tu.BOOLQ_EVAL_ROWS == 1000
    assert held_out[0]["question"] == "q5" and held_out[-1]["question"] == "q1004"
    assert [d["gold"] for d in held_out.select(range(2))] == [
        0,
        1,
    ]  # q5 -> "False" -> no; q6 -> "True" -> yes


def test_xsum_eval_rows_are_the_last_two_hundred_and_truncated() -> None:
    ds = datasets.Dataset.from_list(
        [{"id": str(i), "document": "word " * 1000, "summary": "s"} for i in range(250)]
    )
    held_out = tu.docs_xsum(ds)
    assert [d["id"] for d in held_out][:1] == ["50"] and len(held_out) == tu.XSUM_EVAL_ROWS
    assert len(held_out[0]["document"]) <= tu.XSUM_MAX_CHARS
    assert held_out[0]["document"].endswith("word")  # cut at a word boundary


def _facts(n_relations: int = 2, n_objects: int = 8) -> list[dict]:
    return [
        {"relation_id": f"P{r}", "object": f"obj{r}_{k}", "prompt": f"s{r}_{k} is in"}
        for r in range(n_relations)
        for k in range(n_objects)
    ]


def test_distractors_come_from_the_same_relation_and_are_deterministic() -> None:
    rows = _facts()
    first = tu._with_distractors(rows, gold_key="object", group_key="relation_id", seed="t")
    again = tu._with_distractors(rows, gold_key="object", group_key="relation_id", seed="t")
    assert first == again
    positions = set()
    for row in first:
        choices = row["choices"]
        assert len(choices) == tu.NUM_DISTRACTORS + 1
        assert choices[row["gold"]] == row["object"]
        assert len({normalize_answer(c) for c in choices}) == len(choices)
        assert all(c.startswith(f"obj{row['relation_id'][1:]}_") for c in choices)
        positions.add(row["gold"])
    assert len(positions) > 1  # the gold is not always in the same slot


def test_distractors_drop_relations_with_too_few_objects() -> None:
    rows = _facts(n_relations=1, n_objects=tu.NUM_DISTRACTORS)  # gold + 3 others: one short
    assert tu._with_distractors(rows, gold_key="object", group_key="relation_id", seed="t") == []
    pool = rows + [{"relation_id": "P0", "object": "extra"}]
    assert (
        len(tu._with_distractors(rows, gold_key="object", group_key="relation_id", seed="t", pool_rows=pool))
        == 4
    )


def test_load_lama_uses_the_first_template_and_keeps_its_suffix(tmp_path: Path) -> None:
    (tmp_path / "patterns").mkdir()
    (tmp_path / "trex_lms_vocab").mkdir()
    patterns = [{"pattern": "[X] is a [Y] by profession ."}, {"pattern": "[X] works as a [Y] ."}]
    (tmp_path / "patterns" / "P106.jsonl").write_text("\n".join(json.dumps(p) for p in patterns) + "\n")
    jobs = ["lawyer", "actor", "poet", "singer", "painter", "architect"]
    facts = [{"sub_label": f"Person {i}", "obj_label": job, "uuid": str(i)} for i, job in enumerate(jobs)]
    (tmp_path / "trex_lms_vocab" / "P106.jsonl").write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    (tmp_path / "trex_lms_vocab" / "P31.jsonl").write_text(json.dumps(facts[0]) + "\n")  # no pattern: skipped
    docs = tu.load_lama(str(tmp_path), version=1.0)["test"]
    assert len(docs) == len(jobs)
    doc = next(d for d in docs if d["subject"] == "Person 0")
    assert doc["prompt"] == "Person 0 is a" and doc["suffix"] == " by profession."
    assert doc["golds"] == ["lawyer"]
    assert tu.docs_rank_choices(doc)[doc["gold"]] == "lawyer by profession."
    assert [d["subject"] for d in docs] == [d["subject"] for d in tu.load_lama(str(tmp_path))["test"]]


def test_scoring_hooks() -> None:
    qa = tu.results_qa({"golds": ["Paris", "City of Paris"]}, ["\n Paris is the capital.\nMore text"])
    assert qa == {"em": 0.0, "f1": pytest.approx(0.5), "contains": 1.0}  # first line "Paris is the capital."
    assert tu.results_trec({"pattern": r"China|PRC"}, [" china"]) == {"regex": 1.0}
    assert tu.results_cloze({"golds": ["Antarctica"]}, [" Antarctica, the"]) == {
        "prefix": 1.0,
        "contains": 1.0,
    }
    rank = tu.results_rank({"gold": 1}, [(-3.0, False), (-2.0, True), (-1.0, False)])
    assert rank == {"acc": 0.0, "mrr": 0.5}
    rouge = tu.results_rouge({"summary": "the cat sat on the mat"}, ["the cat sat on the mat\nextra"])
    assert rouge["rougeL"] == pytest.approx(1.0)


def test_ag_news_text_cleanup() -> None:
    ds = datasets.Dataset.from_list([{"text": r"Oil #36;50\barrel, it #39;s up", "label": "Business"}])
    doc = tu.docs_ag_news(ds)[0]
    assert doc["text"] == "Oil $50 barrel, it's up" and doc["gold"] == 2
