"""Sources, mixtures, answer-only labels, the collator and build_dataset (loramoe.data)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from loramoe.data.dataset import IGNORE_INDEX, DataCollatorForLoRAMoE, ExampleEncoder, build_dataset
from loramoe.data.formats import Example
from loramoe.data.sources import DataConfig, SourceConfig, examples_from_records, load_examples, mix_examples
from loramoe.errors import ConfigError, DataError

from tiny import tiny_model, tiny_tokenizer

# Twelve records of the reference repository's own sample file, in its exact format (tests/fixtures/data/README.md).
LORAMOE_TINY = (
    Path(__file__).resolve().parents[1] / "fixtures" / "data" / "loramoe_tiny" / "train" / "train.json"
)
# The whole file (1,565 records), when a local data directory holds it.
REAL_LORAMOE_TINY = (
    Path(os.environ.get("LORAMOE_DATA_DIR", "/nonexistent")) / "loramoe_tiny" / "train" / "train.json"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pc_records(n: int, tag: str, task_type: int | str | None = None) -> list[dict]:
    extra = {} if task_type is None else {"task_type": task_type}
    return [{"prompt": f"{tag} prompt {i}", "completion": f"{tag} answer {i}", **extra} for i in range(n)]


def labelled_text(tok, features: dict) -> str:
    return tok.decode(
        [t for t, label in zip(features["input_ids"], features["labels"]) if label != IGNORE_INDEX]
    )


def bos_adding(tok):
    """The tiny tokenizer with its own BOS ``<s>``, which it prepends itself as Llama's does."""
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


# --- configs ------------------------------------------------------------------------------------------------


def test_configs_round_trip_through_json():
    cfg = DataConfig(
        sources=[
            SourceConfig(path="a.jsonl", task_type="knowledge", ratio=0.25, columns={"question": "qText"}),
            SourceConfig(hf_dataset="org/set", hf_config="en", split="validation", num_samples=7, name="set"),
            SourceConfig(path=Path("b.json"), format="loramoe", skip_invalid=True),
        ],
        max_length=64, seed=3, template="plain", val_size=0.1, total_samples=100,
    )  # fmt: skip
    again = DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.sources[2].path == "b.json"
    assert DataConfig.from_dict({"sources": ["x.jsonl"]}).sources == [SourceConfig(path="x.jsonl")]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"sources": []}, r"sources must be a non-empty list"),
        ({"sources": ["a.json"], "max_length": 1}, r"max_length must be an integer >= 2, got 1"),
        ({"sources": ["a.json"], "template": "jinja"}, r"template must be one of \['auto', 'chat', 'plain'\]"),
        ({"sources": ["a.json"], "val_size": 1.5}, r"val_size must be a count >= 0 or a fraction in \[0, 1\)"),
        ({"sources": [{"path": "a.json", "ratio": 0.5}]}, r"need total_samples"),
        ({"sources": [{"path": "a", "ratio": 0.7}, {"path": "b", "ratio": 0.7}], "total_samples": 10}, r"add up to 1\.4"),
        ({"sources": ["a.json", "x/a.json"]}, r"several sources are named \['a\.json'\]; give each a distinct name"),
        ({"sources": [{"path": "a.json", "hf_dataset": "x"}]}, r"give exactly one of path and hf_dataset; got path=.a.json., hf_dataset=.x."),
        ({"sources": [{"path": "a.json", "num_samples": 3, "ratio": 0.5}], "total_samples": 9}, r"not both"),
        ({"sources": [{"path": "a.json", "num_samples": 0}]}, r"sources\[0\]: num_samples must be an integer >= 1 or null"),
        ({"sources": [{"path": "a.json", "columns": {"qtext": "q"}}]}, r"columns must be a mapping from fields"),
        ({"sources": [{"path": "a.json", "format": "csv"}]}, r"format must be one of \['auto', 'messages', 'alpaca'"),
        ({"sources": [{"path": "a.json", "pth": "b"}]}, r"unknown key\(s\) \['pth'\]; valid keys: path, hf_dataset"),
        ({"sources": ["a.json"], "seeds": 1}, r"DataConfig: unknown key\(s\) \['seeds'\]; valid keys: sources, max_length"),
    ],
)  # fmt: skip
def test_bad_configs_say_what_to_do(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DataConfig.from_dict(kwargs)


config_values = st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats() | st.text(max_size=6)
source_dicts = st.dictionaries(
    st.sampled_from(["path", "hf_dataset", "name", "format", "task_type", "num_samples", "ratio", "columns",
                     "skip_invalid", "split", "bogus"]),
    config_values | st.dictionaries(st.sampled_from(["question", "x"]), config_values, max_size=2),
    max_size=5,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["sources", "max_length", "seed", "template", "val_size", "total_samples", "bogus"]),
    config_values | st.lists(source_dicts | st.text(max_size=4) | config_values, max_size=3),
    max_size=6,
))  # fmt: skip
def test_fuzz_data_config_from_dict_gives_config_or_config_error(d):
    try:
        cfg = DataConfig.from_dict(d)
    except ConfigError:
        return
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- loading ------------------------------------------------------------------------------------------------


def test_reference_loramoe_tiny_records_load_as_is_with_both_task_types():
    examples = load_examples(SourceConfig(path=str(LORAMOE_TINY)))
    assert len(examples) == 12
    assert Counter(e.task_type for e in examples) == {0: 8, 1: 4}
    knowledge = next(e for e in examples if e.task_type == 1)
    assert knowledge.prompt.startswith("Question: ") and knowledge.prompt.endswith("\nAnswer:")
    assert all(e.source == "train.json" and e.answer.strip() for e in examples)


@pytest.mark.skipif(
    not REAL_LORAMOE_TINY.is_file(), reason="the whole loramoe_tiny file is not in $LORAMOE_DATA_DIR"
)
def test_the_whole_reference_loramoe_tiny_file_loads_as_is():
    examples = load_examples(SourceConfig(path=str(REAL_LORAMOE_TINY)))
    assert Counter(e.task_type for e in examples) == {0: 1265, 1: 300}


def test_source_task_type_by_name_and_unknown_name_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a"}])
    assert load_examples(SourceConfig(path=str(path), task_type="knowledge"))[0].task_type == 1
    assert load_examples(SourceConfig(path=str(path), task_type=2), ["a", "b", "c"])[0].task_type == 2
    with pytest.raises(
        ConfigError, match=r"source 'qa\.jsonl': task_type 'facts' is not one of 0 \('downstream'\)"
    ):
        load_examples(SourceConfig(path=str(path), task_type="facts"))


def test_all_invalid_with_skip_invalid_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "", "task_type": 0}])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable records \(1 invalid ones skipped\)"):
        load_examples(SourceConfig(path=str(path), skip_invalid=True))


def test_records_in_memory_and_hf_dataset_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.Dataset.from_list(pc_records(3, "mem"))
    examples = examples_from_records(ds, name="mem", task_type="knowledge")
    assert [(e.answer, e.task_type, e.source) for e in examples][0] == ("mem answer 0", 1, "mem")
    write_jsonl((tmp_path / "folder").mkdir() or tmp_path / "folder" / "train.jsonl", pc_records(2, "hf", 0))
    examples = load_examples(SourceConfig(hf_dataset=str(tmp_path / "folder")))
    assert [e.answer for e in examples] == ["hf answer 0", "hf answer 1"]
    with pytest.raises(DataError, match="cannot load split 'test'"):
        load_examples(SourceConfig(hf_dataset=str(tmp_path / "folder"), split="test"))


# --- mixtures -----------------------------------------------------------------------------------------------


def groups_and_config(sizes: list[int], **kw) -> tuple[list[list[Example]], dict]:
    groups = [
        [Example(f"p{s}-{i}", f"a{s}-{i}", s % 2, f"s{s}") for i in range(n)] for s, n in enumerate(sizes)
    ]
    return groups, kw


def test_mixture_counts_num_samples_repeats_and_ratios():
    groups, _ = groups_and_config([10, 4, 6])
    cfg = DataConfig(
        sources=[{"path": "s0", "num_samples": 3}, {"path": "s1", "num_samples": 9}, {"path": "s2"}], seed=1
    )
    mixed = mix_examples(groups, cfg)
    counts = Counter(e.source for e in mixed)
    assert counts == {"s0": 3, "s1": 9, "s2": 6}
    assert len({e.prompt for e in mixed if e.source == "s0"}) == 3  # drawn without replacement
    s1 = Counter(e.prompt for e in mixed if e.source == "s1")
    assert sorted(s1.values()) == [2, 2, 2, 3]  # two whole copies plus one more drawn
    ratio_cfg = DataConfig(
        sources=[{"path": f"s{i}", "ratio": r} for i, r in enumerate([1 / 3, 1 / 3, 1 / 3])], total_samples=10
    )
    counts = Counter(e.source for e in mix_examples(groups, ratio_cfg))
    assert sum(counts.values()) == 10 and sorted(counts.values()) == [3, 3, 4]


def test_mixture_is_reproducible_by_seed_and_shuffled():
    groups, _ = groups_and_config([50, 50])
    cfg = {"sources": [{"path": "s0", "num_samples": 20}, {"path": "s1", "num_samples": 30}]}
    first = [e.prompt for e in mix_examples(groups, DataConfig(**cfg, seed=7))]
    assert first == [e.prompt for e in mix_examples(groups, DataConfig(**cfg, seed=7))]
    assert first != [e.prompt for e in mix_examples(groups, DataConfig(**cfg, seed=8))]
    assert [e.source for e in mix_examples(groups, DataConfig(**cfg, seed=7))][:20] != ["s0"] * 20


# --- tokenisation with answer-only labels -------------------------------------------------------------------


def test_chat_template_labels_exactly_the_answer_and_eos():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "2+2?"}]
    ex = Example("What is 2+2?", "Four.", 0, messages=messages)
    features, cut = ExampleEncoder(tok).encode(ex)
    assert cut is None and features["task_types"] == 0
    assert labelled_text(tok, features) == "Four.<|im_end|>"
    n_prompt = features["labels"].count(IGNORE_INDEX)
    assert tok.decode(features["input_ids"][:n_prompt]) == (
        "<|im_start|>system\nHi<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert features["labels"][n_prompt:] == features["input_ids"][n_prompt:]
    assert features["attention_mask"] == [1] * len(features["input_ids"])


def test_plain_template_is_the_references_prompt_eos_answer_eos():
    tok = tiny_tokenizer(chat_template=False)
    encoder = ExampleEncoder(tok)
    assert encoder.template == "plain" and not encoder.add_bos
    features, _ = encoder.encode(Example("Question: sky?\nAnswer:", " blue", 1))
    assert tok.decode(features["input_ids"]) == "Question: sky?\nAnswer:<|im_end|> blue<|im_end|>"
    assert labelled_text(tok, features) == " blue<|im_end|>"
    assert features["input_ids"].count(tok.bos_token_id) == 0


def test_bos_appears_once_whether_the_tokenizer_or_the_template_adds_it():
    plain = ExampleEncoder(bos_adding(tiny_tokenizer(chat_template=False)))
    assert plain.add_bos
    for prompt in ("hi", "<s>hi"):  # a prompt that already starts with BOS does not get a second
        ids = plain.prompt_ids(Example(prompt, "yo", 0))
        assert ids[0] == plain.bos and ids.count(plain.bos) == 1
    tok = bos_adding(tiny_tokenizer())
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # like Llama's, which writes BOS itself
    features, _ = ExampleEncoder(tok).encode(Example("hi", "yo", 0))
    assert features["input_ids"].count(tok.bos_token_id) == 1 and features["input_ids"][0] == tok.bos_token_id
    assert (
        tok.decode(features["input_ids"])
        == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>"
    )


def test_long_prompt_is_cut_from_the_left_and_the_answer_kept_whole():
    tok = tiny_tokenizer()
    ex = Example("x" * 200 + " END", "the answer", 0)
    features, cut = ExampleEncoder(tok, max_length=40).encode(ex)
    assert cut == "prompt" and len(features["input_ids"]) == 40
    assert labelled_text(tok, features) == "the answer<|im_end|>"
    assert tok.decode(features["input_ids"]).endswith(
        " END<|im_end|>\n<|im_start|>assistant\nthe answer<|im_end|>"
    )


def test_long_answer_is_cut_from_the_right_without_eos():
    tok = tiny_tokenizer(chat_template=False)
    features, cut = ExampleEncoder(tok, max_length=20).encode(Example("prompt", "a" * 50, 0))
    assert cut == "answer" and len(features["input_ids"]) == 20
    n_prompt = features["labels"].count(IGNORE_INDEX)
    assert (
        n_prompt == 7 and labelled_text(tok, features) == "a" * 13
    )  # the whole (short) prompt + its EOS stay
    features, _ = ExampleEncoder(tok, max_length=4).encode(Example("a long prompt", "b" * 9, 0))
    assert features["labels"][:2] == [IGNORE_INDEX] * 2 and labelled_text(tok, features) == "bb"


def test_template_choice():
    assert ExampleEncoder(tiny_tokenizer(), template="plain").template == "plain"
    assert ExampleEncoder(tiny_tokenizer()).template == "chat"
    with pytest.raises(ConfigError, match="template: chat needs a tokenizer with a chat template"):
        ExampleEncoder(tiny_tokenizer(chat_template=False), template="chat")
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(DataError, match=r"^f\.jsonl:3: the tokenizer's chat template rejected the record"):
        ExampleEncoder(tok).encode(Example("p", "a", 0, source="f.jsonl", line=3))


# --- collator -----------------------------------------------------------------------------------------------


def test_collator_right_pads_and_returns_task_types():
    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok)
    feats = [encoder.encode(Example("hi", "yo", 1))[0], encoder.encode(Example("a longer prompt", "x", 0))[0]]
    batch = DataCollatorForLoRAMoE(tok, pad_to_multiple_of=8)(feats)
    B, T = batch["input_ids"].shape
    assert (B, T % 8, len(feats[1]["input_ids"]) <= T) == (2, 0, True)
    assert batch["task_types"].dtype == torch.long and batch["task_types"].tolist() == [1, 0]
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and (
            batch["labels"][i, n:] == -100
        ).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
    with pytest.raises(DataError, match="no task_types"):
        DataCollatorForLoRAMoE(tok)([{"input_ids": [1], "labels": [1]}])


def test_collated_batch_feeds_a_causal_lm_through_a_dataloader():
    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok, max_length=32)
    feats = [encoder.encode(Example(f"prompt {i}" * (i + 1), f"answer {i}", i % 2))[0] for i in range(4)]
    loader = torch.utils.data.DataLoader(feats, batch_size=4, collate_fn=DataCollatorForLoRAMoE(tok))
    batch = next(iter(loader))
    task_types = batch.pop("task_types")  # (B,): for the loss, never for the model
    loss = tiny_model("llama")(**batch).loss
    assert task_types.shape == (4,) and torch.isfinite(loss)


# --- build_dataset ------------------------------------------------------------------------------------------


def test_build_dataset_mixes_tokenises_and_reports(tmp_path, caplog):
    down = write_jsonl(tmp_path / "down.jsonl", pc_records(12, "down", "downstream"))
    know = write_jsonl(
        tmp_path / "know.jsonl", [{"question": "q" * (i * 20), "answer": f"a{i}"} for i in range(1, 9)]
    )
    cfg = DataConfig(
        sources=[SourceConfig(path=str(down), num_samples=6), SourceConfig(path=str(know), task_type=1)],
        max_length=48, seed=0, val_size=4,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="loramoe.data"):
        train, val, stats = build_dataset(cfg, tiny_tokenizer())
    assert (len(train), len(val), stats.examples, stats.val_examples) == (10, 4, 10, 4)
    assert sum(stats.per_source.values()) == 10 and set(stats.per_source) <= {"down.jsonl", "know.jsonl"}
    assert sum(stats.per_task.values()) == 10 and list(stats.per_task) == ["downstream", "knowledge"]
    assert stats.per_task["knowledge"] == sum(f["task_types"] == 1 for f in train)
    encoder = ExampleEncoder(tiny_tokenizer(), max_length=48)
    too_long = [encoder.encode(e)[1] for e in load_examples(cfg.sources[1])]  # the short downstream ones fit
    assert stats.prompt_truncated == too_long.count("prompt") > 0 and stats.answer_truncated == 0
    assert stats.label_tokens == sum(sum(x != -100 for x in f["labels"]) for f in [*train, *val])
    assert all(len(f["input_ids"]) <= 48 for f in train) and stats.template == "chat"
    assert "prompts cut from the left" in caplog.text
    assert build_dataset(cfg, tiny_tokenizer()).train == train  # reproducible


def test_build_dataset_warns_about_a_missing_task_type_and_rejects_a_too_large_val(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", pc_records(3, "d", 0))
    with caplog.at_level("WARNING", logger="loramoe.data"):
        data = build_dataset(DataConfig(sources=[str(path)], val_size=0.34), tiny_tokenizer())
    assert (len(data.train), len(data.val)) == (2, 1) and "['knowledge']" in caplog.text
    assert build_dataset(DataConfig(sources=[str(path)]), tiny_tokenizer()).val is None
    with pytest.raises(ConfigError, match="leaves no training examples"):
        build_dataset(DataConfig(sources=[str(path)], val_size=3), tiny_tokenizer())


def test_build_dataset_on_the_reference_data_plain_template():
    cfg = DataConfig(
        sources=[{"path": str(LORAMOE_TINY), "num_samples": 12}], max_length=96, template="plain"
    )
    train, _, stats = build_dataset(cfg, tiny_tokenizer())
    assert len(train) == 12 and {f["task_types"] for f in train} == {0, 1}
    assert stats.prompt_truncated > 0 and stats.answer_truncated > 0
    eos = tiny_tokenizer().eos_token_id
    assert sum(f["labels"][-1] != eos for f in train) == stats.answer_truncated
    assert all(len(f["input_ids"]) <= 96 and f["labels"][0] == IGNORE_INDEX for f in train)


@pytest.mark.slow  # ~8 s, mostly importing the Trainer stack
def test_collator_works_in_a_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    seen = []

    class TaskTypeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            seen.append(inputs.pop("task_types"))  # (B,): what the balancing loss will read
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    tok = tiny_tokenizer()
    train = ExampleEncoder(tok, max_length=32)
    dataset = [train.encode(Example(f"p{i}", f"a{i}", i % 2))[0] for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
        remove_unused_columns=False, use_cpu=True, save_strategy="no",
    )  # fmt: skip
    collator = DataCollatorForLoRAMoE(tok)
    TaskTypeTrainer(
        model=tiny_model("llama"), args=args, train_dataset=dataset, data_collator=collator
    ).train()
    assert len(seen) == 1 and sorted(seen[0].tolist()) == [0, 0, 1, 1]
