"""The model card save_adapter writes beside an adapter: Hub front matter, what the adapter is, the data and the
evaluation figures, and a user's own README.md left alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from loramoe.adapter import CONFIG_NAME, save_adapter
from loramoe.card import CARD_MARKER, CARD_NAME, write_model_card
from loramoe.config import LoRAMoEConfig
from loramoe.inject import inject

from tiny import tiny_model

CFG = LoRAMoEConfig(num_experts=4, rank=2, lbc_weight=0.1, lbc_delta=0.1)
DATA = {"examples": 1200, "val_examples": 30, "per_task": {"downstream": 900, "knowledge": 300},
        "per_source": {"train.json": 1200}, "tokens": 81234, "label_tokens": 20345, "template": "chat",
        "prompt_truncated": 3, "answer_truncated": 1, "skipped_invalid": 0}  # fmt: skip


def _result(scores: dict[str, tuple[str, float]]) -> dict:
    return {"tasks": {t: {"suite": s, "metric": "acc", "score": v, "n": 100} for t, (s, v) in scores.items()}}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def adapted(name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"):
    model = inject(tiny_model("llama"), CFG)
    model.name_or_path = name_or_path
    return model


def test_save_adapter_writes_a_card_with_hub_front_matter_and_the_config(tmp_path: Path):
    out = save_adapter(adapted(), tmp_path / "a", data_summary=DATA)
    text = (out / CARD_NAME).read_text()
    front = _front_matter(text)
    assert front == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "loramoe",
        "tags": ["loramoe", "lora", "mixture-of-experts", "peft"],
    }
    assert CARD_MARKER in text and "arxiv.org/abs/2312.09979" in text
    assert "4 LoRA experts of rank 2" in text and "weight 0.1, delta 0.1" in text
    assert "downstream: experts 0-1; knowledge: experts 2-3" in text
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["weights_sha256"] in text
    assert '| lbc_normalization | `"cv2"` |' in text
    assert "| training examples | 1,200 (downstream 900, knowledge 300) |" in text
    assert "| special tokens written as text | 0 samples |" in text
    quoted = {**DATA, "special_token_samples": 2, "special_token_first": "train.json:7 answer '<|im_end|>'"}
    text = (save_adapter(adapted(), tmp_path / "b", data_summary=quoted) / CARD_NAME).read_text()
    assert (
        "| special tokens written as text | 2 samples (first: train.json:7 answer '<\\|im_end\\|>') |" in text
    )


def test_a_local_or_alias_base_gets_no_base_model_key(tmp_path: Path):
    out = save_adapter(adapted("smollm2-135m-instruct"), tmp_path / "a")
    text = (out / CARD_NAME).read_text()
    assert "base_model" not in _front_matter(text) and "`smollm2-135m-instruct`" in text
    assert "Not recorded" in text  # no data summary outside the trainer
    assert write_model_card(out, hub_base_model="org/base") is not None
    assert _front_matter((out / CARD_NAME).read_text())["base_model"] == "org/base"


def test_evaluation_figures_with_the_base_model_show_retention_and_change(tmp_path: Path):
    out = save_adapter(adapted(), tmp_path / "a")
    results = _result({"loramoe_webq": ("knowledge", 0.30), "loramoe_sst2": ("downstream", 0.90)})
    base = _result({"loramoe_webq": ("knowledge", 0.32), "loramoe_sst2": ("downstream", 0.60)})
    write_model_card(out, data=DATA, results=results, base_results=base)
    text = (out / CARD_NAME).read_text()
    assert (
        "world-knowledge retention suite: mean 0.300 (base model 0.320, change -0.020) over 1 task(s)" in text
    )
    assert "downstream suite: mean 0.900 (base model 0.600, change +0.300)" in text
    assert "| downstream | loramoe_sst2 | acc | 0.900 | 100 | 0.600 | +0.300 |" in text
    assert "1,200 (downstream 900" in text  # the data summary given again is kept


def test_a_users_own_readme_is_kept_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / CARD_NAME).write_text("# my notes\n")
    with caplog.at_level(logging.WARNING, logger="loramoe.card"):
        save_adapter(adapted(), folder)
    assert (folder / CARD_NAME).read_text() == "# my notes\n"
    assert "not a loramoe model card, so it was kept" in caplog.text


def test_our_own_card_is_rewritten_on_the_next_save(tmp_path: Path):
    out = save_adapter(adapted(), tmp_path / "a", data_summary=DATA)
    save_adapter(adapted(), out)
    assert "Not recorded" in (out / CARD_NAME).read_text()


def test_no_lbc_is_said_plainly():
    from loramoe.card import render_card

    meta = {"config": {**LoRAMoEConfig(num_experts=2, rank=2, lbc_weight=0.0).to_dict()}, "base_model": {}}
    assert "without the localized balancing constraint" in render_card(meta)
