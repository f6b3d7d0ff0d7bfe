"""The demo: its data's integrity (disjoint fact splits, deterministic generators) and the pipeline end to end on a
tiny model saved to disk (the same path ``train(RunConfig)`` takes for any local model)."""

from __future__ import annotations

import json
import re

import pytest

from loramoe.demo.evaluation import results_table
from loramoe.demo.items import TASKS, demo_facts, downstream_items, load_demo_json
from loramoe.demo.run import DemoConfig, run_demo
from loramoe.errors import ConfigError

from tiny import tiny_model, tiny_tokenizer


def test_sft_and_heldout_facts_are_disjoint_and_well_formed():
    facts = demo_facts()
    questions = [f["question"] for split in facts.values() for f in split]
    assert len(questions) == len(set(questions))  # no fact twice, so none in both splits
    assert len(facts["sft"]) >= 30 and len(facts["heldout"]) >= 40
    for fact in facts["sft"] + facts["heldout"]:
        assert fact["question"].endswith("?")
        assert fact["answers"] and all(isinstance(a, str) and a.strip() for a in fact["answers"])


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_disjoint_and_seeded(task):
    a = downstream_items(task, 50, 20, seed=3)
    assert a == downstream_items(task, 50, 20, seed=3)
    assert a != downstream_items(task, 50, 20, seed=4)
    assert downstream_items(task, 10, 20, seed=3)["test"] == a["test"]  # the test set ignores n_train
    train, test = {r["prompt"] for r in a["train"]}, {r["prompt"] for r in a["test"]}
    assert len(train) == 50 and len(test) == 20 and not train & test


def test_generated_answers_are_right():
    labels = load_demo_json("downstream.json")["review"]["labels"]
    words = load_demo_json("downstream.json")["review"]
    for item in downstream_items("review_code", 30, 0)["train"]:
        mood = "positive" if any(f" {w} and" in item["prompt"] for w in words["positive"]) else "negative"
        assert item["completion"] == labels[mood]
    for item in downstream_items("sort_words", 30, 0)["train"]:
        picked = item["prompt"].split(": ", 1)[1].split(", ")
        assert item["completion"] == ", ".join(sorted(picked))
    for item in downstream_items("sum_format", 30, 0)["train"]:
        a, b = map(int, re.findall(r"\d+", item["prompt"]))
        assert item["completion"] == f"#{a + b}#"


def test_config_defaults_by_mode_and_validation():
    assert DemoConfig(quick=True).steps < DemoConfig().steps
    assert DemoConfig(steps=7).steps == 7
    with pytest.raises(ConfigError, match="steps"):
        DemoConfig(steps=0)
    with pytest.raises(ConfigError, match="threads"):
        DemoConfig(threads=0)
    with pytest.raises(ConfigError, match="unknown demo task"):
        downstream_items("nope", 1, 1)


def test_demo_end_to_end_on_a_tiny_model(tmp_path):
    base = tmp_path / "tiny"
    tiny_model("llama", max_position_embeddings=512).save_pretrained(base)  # the demo uses 256-token samples
    tiny_tokenizer().save_pretrained(base)
    cfg = DemoConfig(model=str(base), output_dir=str(tmp_path / "demo"), quick=True, steps=2, train_per_task=4,
                     test_per_task=2, heldout_facts=3, max_new_tokens=3, plot=False, threads=1, progress=False)  # fmt: skip
    results = run_demo(cfg)
    assert set(results["scores"]) == {"base", "lora", "loramoe"}
    for scores in results["scores"].values():
        assert set(scores) == {"facts_heldout", *TASKS, "downstream_mean"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    out = tmp_path / "demo"
    written = json.loads((out / "demo_results.json").read_text())
    assert written["scores"] == results["scores"]
    assert (out / "lora" / "adapter_config.json").is_file() and (
        out / "loramoe" / "train_results.json"
    ).is_file()
    assert (out / "routing.json").is_file() and (out / "routing.md").is_file()  # PNGs: test_analysis
    assert set(results["routing"]["task_types"]) == {"knowledge", "downstream"}
    assert len((out / "data" / "train_downstream.jsonl").read_text().splitlines()) == 4 * len(TASKS)
    assert set(results["times"]["phases"]) == {"evaluate base", "train lora", "evaluate lora", "train loramoe",
                                               "evaluate loramoe", "routing"}  # fmt: skip
    table = results_table(results)
    assert table.count("\n| ") == 3 and "LoRAMoE" in table
