"""Write the generated half of the bad-input corpus: ``generated/`` and ``generated_cases.json``.

Run from the repository root: ``.venv/bin/python tests/bad_inputs/make_corpus.py`` (deterministic; commit the
result). The hand-written half is ``hand/`` and ``hand_cases.json``; ``tests/test_reliability_corpus.py`` runs
both.

A case is one manifest entry:

- ``{"id", "config": "generated/configs/x.yaml", "overrides": [...]}``: ``loramoe train CONFIG [OVERRIDES]``;
- ``{"id", "adapter": "generated/adapters/x", "model": "other"}``: ``loramoe generate --adapter ... [--model]``;

with ``"error"`` (the ``loramoe.errors`` type the library raises) and ``"match"`` (a regex the one-line message
must contain: the file and the line or field, and what is wrong). Paths inside configs are relative to the test's
workspace, which holds ``base/`` (a tiny llama and its tokenizer), ``other/`` (a tiny llama of another FFN width),
``noffn/`` (a tiny model of an architecture without known FFN targets), ``good.jsonl`` and ``corpus/`` (this
folder).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import sys
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


# --- data files: each gets a config pointing at it ---------------------------------------------------------


def data_case(name: str, content: bytes | str, match: str, *, error: str = "DataError", ext: str = "jsonl",
              source: dict | None = None) -> None:  # fmt: skip
    path = OUT / "data" / f"{name}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    rel = f"{REL}/data/{name}.{ext}"
    config = with_value("data.sources", [{"path": rel, **(source or {})}])
    where = re.escape(f"{name}.{ext}")
    case(f"data/{name}", error, match.replace("FILE", where), config=write_config(f"data-{name}", config))


def jsonl(records: list[Any]) -> str:
    """One record a line, non-ASCII written as is (escaped only where it cannot be UTF-8: lone surrogates)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return "".join(
        (line if line.isascii() or _utf8(line) else json.dumps(r)) + "\n" for line, r in zip(lines, records)
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def gen_data() -> None:
    good = GOOD["alpaca"]
    prefix = jsonl(good)  # two good lines: the bad one is line 3
    malformed_lines = {
        "trailing-comma": '{"instruction": "a", "output": "b",}',
        "single-quotes": "{'instruction': 'a', 'output': 'b'}",
        "unquoted-key": '{instruction: "a", "output": "b"}',
        "missing-brace": '{"instruction": "a", "output": "b"',
        "two-objects": '{"instruction": "a", "output": "b"} {"instruction": "c", "output": "d"}',
        "bare-text": "this is not json",
        "unclosed-string": '{"instruction": "a, "output": "b"}',
        "bad-escape": '{"instruction": "a\\x41", "output": "b"}',
        "control-char": '{"instruction": "a\tb", "output": "b"}'.replace("\\t", "\t"),
        "truncated": '{"instruction": "a", "outp',
        "missing-colon": '{"instruction" "a", "output": "b"}',
        "python-none": '{"instruction": "a", "output": None}',
        "comment": '// a comment\n{"instruction": "a", "output": "b"}',
        "deep-nesting": "[" * 5_000 + "]" * 5_000,
    }
    for name, line in malformed_lines.items():
        data_case(f"jsonl-{name}", prefix + line + "\n" + jsonl(good), r"FILE:3\b.*(malformed|nested)")
    data_case("jsonl-bad-first-line", "{oops}\n" + prefix, r"FILE:1\b.*malformed")
    data_case("jsonl-bad-last-line-no-newline", prefix * 3 + '{"instruction": "a"', r"FILE:7\b.*malformed")

    array_cases = {
        "missing-bracket": ('[\n{"instruction": "a", "output": "b", "task_type": 0}\n', r"FILE:\d+.*malformed"),
        "trailing-comma": ('[\n{"instruction": "a", "output": "b", "task_type": 0},\n]\n', r"FILE:3\b.*malformed"),
        "missing-comma": ('[\n{"instruction": "a", "output": "b", "task_type": 0}\n{"instruction": "c"}\n]\n',
                          r"FILE:3\b.*malformed"),
        "extra-data": ('[{"instruction": "a", "output": "b", "task_type": 0}]\n{"x": 1}\n', r"FILE:2\b.*extra data"),
        "unclosed-string": ('[\n{"instruction": "a", "output": "b\n}]\n', r"FILE:2\b.*malformed"),
        "only-open": ("[", r"FILE.*malformed"),
        "nested-garbage": ('[\n{"instruction": "a", "output": "b", "task_type": 0},\n{"instruction": [1, 2,}\n]',
                           r"FILE:3\b.*malformed"),
        "object-not-array": ('{"instruction": "a", "output": "b", "task_type": 0,\n "x": [1, 2\n}\n',
                             r"FILE:1\b.*malformed"),
        "deep-nesting": ("[" + "[" * 5_000 + "]" * 5_000 + "]", r"FILE:1\b.*malformed"),
    }  # fmt: skip
    for name, (text, match) in array_cases.items():
        data_case(f"json-{name}", text, match, ext="json")

    # encodings: UTF-8 is required
    body = jsonl([*good, {"instruction": "Café?", "output": "Crème", "task_type": 0}])
    encodings = {
        "latin1": (body.encode("latin-1"), r"FILE:3\b.*not UTF-8"),
        "cp1252-quotes": (jsonl([*good, {"instruction": "“hi”", "output": "x", "task_type": 0}]).encode("cp1252"),
                          r"FILE:3\b.*not UTF-8"),
        "utf16-le-bom": (body.encode("utf-16"), r"FILE:1\b.*not UTF-8"),
        "utf16-be": (body.encode("utf-16-be"), r"FILE:\d+\b.*(not UTF-8|malformed)"),  # no BOM: NULs, valid UTF-8
        "utf32": (body.encode("utf-32"), r"FILE:1\b.*not UTF-8"),
        "shift-jis": (jsonl([*good, {"instruction": "日本", "output": "x", "task_type": 0}]).encode("shift_jis"),
                      r"FILE:3\b.*not UTF-8"),
        "binary-garbage": (bytes(range(256)) * 4, r"FILE:2\b.*not UTF-8"),  # 0x80 comes after the first 0x0a
    }  # fmt: skip
    for name, (content, match) in encodings.items():
        data_case(f"encoding-{name}", content, match)

    # whole-file problems
    data_case("empty", "", r"FILE.*empty")
    data_case("whitespace-only", "  \n\n\t\n", r"FILE.*empty")
    data_case("empty-array", "[]", r"FILE.*no records", ext="json")
    data_case("nul-bytes", "\0" * 64, r"FILE:1\b.*malformed")

    # records of the wrong kind
    for name, record in {"list": [1, 2], "string": "hello", "number": 3, "null": None, "bool": True}.items():
        data_case(f"record-is-{name}", prefix + json.dumps(record) + "\n", r"FILE:3\b.*not a JSON object")
    data_case(
        "record-unknown-format",
        jsonl([{"text": "a", "label": 1}]),
        r"FILE:1\b.*cannot tell the record format",
    )
    data_case("record-empty-object", jsonl([{}]), r"FILE:1\b.*cannot tell the record format")
    data_case("record-format-switch", prefix + jsonl([{"question": "q?", "answer": "a", "task_type": 0}]),
              r"FILE:3\b field 'instruction'.*missing")  # fmt: skip

    # task types
    task_types = {"unknown-name": "math", "out-of-range": 2, "negative": -1, "float": 0.5, "bool": True,
                  "null": None, "list": [0], "empty-string": ""}  # fmt: skip
    for name, value in task_types.items():
        record = {"instruction": "a", "output": "b", "task_type": value}
        data_case(
            f"task-type-{name}", prefix + jsonl([record]), r"FILE:3\b field 'task_type'.*unknown task type"
        )
    data_case("task-type-missing", prefix + jsonl([{"instruction": "a", "output": "b"}]),
              r"FILE:3\b field 'task_type'.*missing")  # fmt: skip

    # fields, format by format: (format, record, field)
    bad_fields = [
        ("alpaca", {"instruction": "a", "output": ""}, "output", "empty answer"),
        ("alpaca", {"instruction": "a", "output": "   \n "}, "output", "empty answer"),
        ("alpaca", {"instruction": "a", "output": None}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": 42}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": ["b"]}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": {"text": "b"}}, "output", "must be a string"),
        ("alpaca", {"instruction": "", "output": "b"}, "instruction", "empty prompt"),
        ("alpaca", {"instruction": 7, "output": "b"}, "instruction", "must be a string"),
        ("alpaca", {"instruction": "a", "input": 3, "output": "b"}, "input", "must be a string"),
        ("alpaca", {"instruction": "a", "output": "\ud800"}, "output", "surrogate"),
        ("qa", {"question": "q", "answer": ""}, "answer", "empty answer"),
        ("qa", {"question": "q", "answer": None}, "answer", "must be a string"),
        ("qa", {"question": "q", "answers": []}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": [1]}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": {"value": 3}}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": {"aliases": ["x"]}}, "answers", "must be a string"),
        ("qa", {"question": "", "answer": "a"}, "question", "empty"),
        ("qa", {"question": ["q"], "answer": "a"}, "question", "must be a string"),
        ("prompt_completion", {"prompt": "p", "completion": ""}, "completion", "empty answer"),
        ("prompt_completion", {"prompt": "p", "completion": 1.5}, "completion", "must be a string"),
        ("prompt_completion", {"prompt": " ", "completion": "c"}, "prompt", "empty prompt"),
        ("prompt_completion", {"prompt": "p"}, "completion", "missing"),
        ("messages", {"messages": "hello"}, "messages", "list of two or more"),
        ("messages", {"messages": [{"role": "assistant", "content": "x"}]}, "messages", "list of two or more"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "messages", "must be the assistant"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1]", "not a {role"),
        ("messages", {"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[0].role",
         "missing"),
        ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
         "messages[0].content", "must be a string"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
         "messages", "empty answer"),
        ("messages", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]},
         "messages", "empty prompt"),
    ]  # fmt: skip
    for i, (fmt, record, field, what) in enumerate(bad_fields):
        lines = jsonl(GOOD[fmt]) + jsonl([{**record, "task_type": 0}])
        bad_line = len(GOOD[fmt]) + 1
        match = rf"FILE:{bad_line}\b field {re.escape(repr(field))}.*{re.escape(what)}"
        data_case(f"field-{fmt}-{field}-{i}".replace("[", "").replace("]", ""), lines, match)
    # the same in a JSON array: errors name the record index and its line
    records = [*good, {"instruction": "a", "output": "", "task_type": 0}]
    data_case("json-array-empty-answer", json.dumps(records, indent=1), r"FILE\[2\]:\d+ field 'output'.*empty answer",
              ext="json")  # fmt: skip
    # every record invalid, but skipped: nothing left to train on
    data_case(
        "all-invalid-skipped", "{bad\n[oops\n", r"FILE.*no usable records", source={"skip_invalid": True}
    )
    data_case("all-records-invalid-skipped", jsonl([{"instruction": "a", "output": ""}] * 3),
              r"FILE.*no usable records", source={"skip_invalid": True, "task_type": 0})  # fmt: skip
    # a format forced on records of another
    data_case("forced-format-mismatch", jsonl(GOOD["qa"]), r"FILE:1\b field 'instruction'.*missing",
              source={"format": "alpaca"})  # fmt: skip
    data_case("columns-map-missing", jsonl([{"q": "a", "a": "b", "task_type": 0}]), r"FILE:1\b.*(missing|format)",
              source={"columns": {"question": "question_text", "answer": "a"}})  # fmt: skip


# --- configs -------------------------------------------------------------------------------------------------


def config_case(
    name: str, dotted: str, value: Any, match: str, error: str = "ConfigError", **kw: Any
) -> None:
    case(f"config/{name}", error, match, config=write_config(name, with_value(dotted, value)), **kw)


def gen_configs() -> None:
    # Every LoRAMoEConfig field: wrong types and out-of-range values.
    lm = {
        "num_experts": [0, -2, 2.5, "8", True, None, 3],
        "rank": [0, -1, 1.5, "4", None, False],
        "alpha": [0, -1.0, "32", None, True, float("nan"), float("inf")],
        "dropout": [-0.1, 1.0, 1.5, "0.1", None, float("nan")],
        "dropout_mode": ["everywhere", 1, None],
        "target_modules": [[], [""], 3, [1], {"a": 1}],
        "top_k": [0, 3, "1", 1.5, -1],
        "lbc_delta": [-0.1, 1.0, "0.1", None, float("nan")],
        "lbc_weight": [-1, "0.1", None, float("nan"), float("inf")],
        "lbc_normalization": ["l2", 0],
        "lbc_reduction": ["max", None],
        "lbc_positions": ["some", 1],
        "task_names": [
            [],
            ["only"],
            ["a", "a"],
            [1, 2],
            "solo",
            3,
            ["a", "b", "c"],
            [["a"], ["b"]],
            [None, "b"],
        ],
        "expert_groups": [[2], [1, 2], [0, 2], [1.5, 0.5], "x", 5, [-1, 3], [True, True]],
    }
    for field, values in lm.items():
        for i, value in enumerate(values):
            config_case(f"loramoe-{field}-{i}", f"loramoe.{field}", value, field)
    config_case("loramoe-unknown-key", "loramoe.num_expert", 4, r"unknown.*num_expert")
    config_case("loramoe-not-mapping", "loramoe", [2, 2], r"loramoe.*mapping")
    config_case("loramoe-odd-experts-binary", "loramoe.num_experts", 5, r"num_experts=5 is odd")
    # the LoRA baseline
    for field, values in {
        "rank": [0, "8", 2.5],
        "alpha": [0, "x", float("inf")],
        "dropout": [1.0, -0.5, "x"],
    }.items():
        for i, value in enumerate(values):
            config_case(f"lora-{field}-{i}", f"lora.{field}", value, rf"lora.*{field}")
    config_case("lora-unknown-key", "lora.r", 8, r"unknown.*'r'")
    config_case("lora-not-mapping", "lora", "rank 8", r"lora.*mapping")
    # RunConfig's own fields
    top = {
        "model": ["", 3, ["base"], None],
        "method": ["qlora", 1, None],
        "dtype": ["fp8", 16, None],
    }
    for field, values in top.items():
        for i, value in enumerate(values):
            config_case(f"run-{field}-{i}", field, value, rf"{field}")
    config_case("run-unknown-key", "epochs", 3, r"unknown key.*epochs")
    config_case("run-data-missing", "data", ..., r"data is missing")
    config_case("run-data-not-mapping", "data", "train.jsonl", r"data.*mapping")
    config_case("run-training-not-mapping", "training", ["output_dir", "out"], r"training must be a mapping")
    config_case("run-output-dir-missing", "training.output_dir", ..., r"output_dir is missing")
    config_case("run-output-dir-number", "training.output_dir", 5, r"output_dir must be a directory")
    config_case("run-output-dir-is-file", "training.output_dir", "good.jsonl", r"output_dir.*is a file")
    config_case("run-model-not-found", "model", "no/such/model_dir", r"no/such/model_dir")
    config_case("run-model-truncated-weights", "model", f"{REL}/adapters/full-truncated", r"full-truncated")
    config_case("run-model-no-ffn-targets", "model", "noffn", r"no known feed-forward targets", "TargetError")
    config_case("run-targets-match-nothing", "loramoe.target_modules", ["ffn_nowhere"], r"ffn_nowhere.*matched no",
                "TargetError")  # fmt: skip
    lora_nothing = with_value("method", "lora")
    lora_nothing["loramoe"]["target_modules"] = ["nope_proj"]
    case("config/lora-targets-match-nothing", "TargetError", r"nope_proj.*matched no",
         config=write_config("lora-targets-match-nothing", lora_nothing))  # fmt: skip
    # DataConfig
    dc = {
        "sources": [[], "good.jsonl", 3, [3], [None]],
        "max_length": [1, 0, "64", 64.5, True],
        "seed": ["x", 1.5, None],
        "template": ["jinja", 1],
        "val_size": [-1, 1.0, 1.5, "0.1", None],
        "total_samples": [0, "x", -3],
    }
    for field, values in dc.items():
        for i, value in enumerate(values):
            config_case(f"data-{field}-{i}", f"data.{field}", value, rf"(?i){field}|source")
    config_case("data-unknown-key", "data.max_len", 64, r"unknown key.*max_len")
    config_case("data-val-size-all", "data.val_size", 8, r"val_size 8 leaves no training examples")
    # SourceConfig
    sc = {
        "path": ["", 3, ["good.jsonl"]],
        "hf_config": [3, ""],
        "split": ["", 3],
        "name": ["", 4],
        "format": ["csv", 1],
        "task_type": ["math", -1, 1.5, 5, True],
        "num_samples": [0, -1, "10", 2.5],
        "ratio": [0, 1.5, "0.5", -0.1],
        "columns": [{"bogus": "x"}, "question", {"question": 3}, ["question"]],
        "skip_invalid": ["yes", 1, None],
    }
    for field, values in sc.items():
        for i, value in enumerate(values):
            config_case(f"source-{field}-{i}", f"data.sources.0.{field}", value, rf"{field}")
    config_case("source-unknown-key", "data.sources.0.file", "good.jsonl", r"unknown key.*file")
    config_case(
        "source-path-and-hf", "data.sources.0.hf_dataset", "squad", r"exactly one of path and hf_dataset"
    )
    config_case("source-missing-file", "data.sources.0.path", "no_such.jsonl", r"no_such\.jsonl.*not found",
                "DataError", names="no_such.jsonl")  # fmt: skip
    config_case("source-path-is-dir", "data.sources.0.path", "base", r"base.*is a directory", "DataError",
                names="base")  # fmt: skip
    config_case("source-hf-not-found", "data.sources", [{"hf_dataset": "corpus/no_such_dataset"}],
                r"no_such_dataset", "DataError", names="no_such_dataset")  # fmt: skip
    both = with_value("data.sources.0.num_samples", 2)
    both["data"]["sources"][0]["ratio"] = 0.5
    case("config/source-num-samples-and-ratio", "ConfigError", r"num_samples or ratio, not both",
         config=write_config("source-num-samples-and-ratio", both))  # fmt: skip
    ratio = with_value("data.sources.0.ratio", 0.5)
    case("config/source-ratio-without-total", "ConfigError", r"total_samples",
         config=write_config("source-ratio-without-total", ratio))  # fmt: skip
    twice = with_value("data.sources", [{"path": "good.jsonl"}, {"path": "good.jsonl"}])
    case("config/source-same-name-twice", "ConfigError", r"several sources are named",
         config=write_config("source-same-name-twice", twice))  # fmt: skip
    # TrainingArguments-level
    ta = {
        "learning_rate": ["fast", -1e-4, float("nan"), None, True],
        "num_train_epochs": [0, -1, "3"],
        "max_steps": ["10", 2.5],
        "per_device_train_batch_size": [0, -4, 2.0, "8"],
        "gradient_accumulation_steps": [0, "2"],
        "save_steps": [0, -5, "10"],
        "logging_steps": [0, "5"],
        "warmup_steps": [-1, "10"],
        "weight_decay": [-0.1, "0.01"],
        "max_grad_norm": [-1.0, "1"],
        "adam_beta1": [1.0, -0.1],
        "adam_epsilon": [0, "1e-8x"],
        "seed": [-1, "42", 2**40, 1.5],
        "lr_scheduler_type": ["zigzag"],
        "optim": ["sgd_magic"],
        "save_strategy": ["sometimes"],
        "use_cpu": ["yes"],
        "dataloader_num_workers": [-1],
        "save_total_limit": [0],
        "label_smoothing_factor": [1.0],
        "bf16": ["true"],
    }
    for field, values in ta.items():
        for i, value in enumerate(values):
            config_case(f"training-{field}-{i}", f"training.{field}", value, rf"training.*{field}|{field}")
    config_case(
        "training-unknown-key", "training.learning_rat", 1e-4, r"unknown training argument.*learning_rat"
    )
    config_case(
        "training-removed-key", "training.warmup_ratio", 0.1, r"unknown training argument.*warmup_ratio"
    )

    # YAML files that are not YAML, or not a mapping
    raw = {
        "yaml-bad-indent": ("model: base\n  method: lora\n", r":2\b.*invalid YAML"),
        "yaml-tab-indent": ("model: base\ndata:\n\tsources: []\n", r":3\b.*invalid YAML"),
        "yaml-unclosed-quote": ('model: "base\nmethod: lora\n', r":\d+\b.*invalid YAML"),
        "yaml-unclosed-bracket": ("model: base\nloramoe: {num_experts: 2\n", r":\d+\b.*invalid YAML"),
        "yaml-double-colon": ("model: base: other\n", r":1\b.*invalid YAML"),
        "yaml-reserved-char": ("model: @base\n", r":1\b.*invalid YAML"),
        "yaml-mixed-seq-map": ("model: base\n- item\n", r":2\b.*invalid YAML"),
        "yaml-python-tag": ("model: !!python/object/apply:os.system ['echo pwned']\n", r":1\b.*invalid YAML"),
        "yaml-undefined-alias": ("model: *base\n", r":1\b.*invalid YAML"),
        "yaml-list": ("- model: base\n- method: lora\n", r"must be a mapping.*list"),
        "yaml-scalar": ("just a string\n", r"must be a mapping.*str"),
        "yaml-empty": ("", r"the config is empty"),
        "yaml-comment-only": ("# nothing here\n", r"the config is empty"),
    }
    for name, (text, match) in raw.items():
        case(
            f"config/{name}",
            "ConfigError",
            rf"{name}\.yaml.*{match}",
            config=write_config(name, None, raw=text),
        )
    for name, encoding in {"yaml-latin1": "latin-1", "yaml-utf16": "utf-16"}.items():
        path = OUT / "configs" / f"{name}.yaml"
        path.write_bytes("model: bäse\n".encode(encoding))
        case(
            f"config/{name}", "ConfigError", rf"{name}\.yaml.*not UTF-8", config=f"{REL}/configs/{name}.yaml"
        )
    # key=value overrides
    base = write_config("override-base", BASE_CONFIG)
    overrides = {
        "no-equals": (["training.learning_rate"], r"must look like key=value"),
        "empty-key": (["=3"], r"must look like key=value"),
        "not-a-section": (["model.name=x"], r"'model' is not a section"),
        "bad-index": (["data.sources.7.path=x.jsonl"], r"'7' is not an index"),
        "bad-value": (["loramoe.rank=0"], r"rank must be an integer >= 1"),
        "unknown-key": (["loramoe.experts=4"], r"unknown.*experts"),
        "wrong-type": (["training.max_steps=many"], r"max_steps"),
    }
    for name, (args, match) in overrides.items():
        names = (
            args[0]
            if name in ("no-equals", "empty-key", "not-a-section", "bad-index")
            else "override-base.yaml"
        )
        case(f"config/override-{name}", "ConfigError", match, config=base, overrides=args, names=names)

    # --- class: settings that validate but would fail only once training starts -----------------------------
    late = {
        "late-optimizer-package": ("training.optim", "adamw_bnb_8bit", r"training\.optim:.*bitsandbytes"),
        "late-scheduler-kwargs": ("training.lr_scheduler_kwargs", {"bogus": 1},
                                  r"training\.lr_scheduler_kwargs:.*bogus"),
        "late-report-to-package": ("training.report_to", "wandb", r"training\.report_to:.*wandb"),
        "late-report-to-unknown": ("training.report_to", "carrier-pigeon", r"training\.report_to:.*not supported"),
        "late-eval-without-validation": ("training.eval_strategy", "steps", r"eval_strategy.*no validation data"),
        "late-max-length-beyond-context": ("data.max_length", 4096, r"data\.max_length 4096.*context \(128"),
        "late-output-dir-unwritable": ("training.output_dir", "/proc/loramoe-out", r"output_dir.*cannot be written"),
        "late-output-dir-foreign": ("training.output_dir", f"{REL}/foreign-output",
                                    r"foreign-output.*holds files loramoe did not write.*checkpoint-500"),
    }  # fmt: skip
    for name, (dotted, value, match) in late.items():
        config_case(name, dotted, value, match)
    foreign = OUT / "foreign-output" / "checkpoint-500"
    foreign.mkdir(parents=True)
    (foreign / "model.ckpt").write_bytes(b"another project's weights")
    case("config/late-base-is-pickle", "ConfigError", r"full-pickle-beside-safetensors.*refusing.*pickle",
         config=write_config("late-base-is-pickle", {**BASE_CONFIG, "model": f"{REL}/adapters/full-pickle-beside-safetensors"}),
         names="pytorch_model.bin")  # fmt: skip

    # --- class: unbounded parsing (sizes, depth, alias expansion, duplicated keys, non-regular files) --------
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
    )
    bounded = {
        "yaml-alias-bomb": (yaml.safe_dump(BASE_CONFIG) + laughs, r"expands to more than \d+ values"),
        "yaml-deep-nesting": (yaml.safe_dump(BASE_CONFIG) + "deep: " + "[" * 200 + "]" * 200 + "\n",
                              r"invalid YAML \(nested deeper than \d+ levels"),
        "yaml-duplicate-key": (yaml.safe_dump(BASE_CONFIG) + "model: other\n", r":\d+: invalid YAML \(key 'model' given twice"),
        "yaml-duplicate-nested-key": ("loramoe: {rank: 2, rank: 8}\n" + yaml.safe_dump({k: v for k, v in BASE_CONFIG.items() if k != "loramoe"}),
                                      r":1: invalid YAML \(key 'rank' given twice"),
    }  # fmt: skip
    for name, (text, match) in bounded.items():
        case(
            f"config/{name}",
            "ConfigError",
            rf"{name}\.yaml.*{match}",
            config=write_config(name, None, raw=text),
        )
    override_bombs = {
        "override-alias-bomb": ("loramoe.task_names=" + "[" + laughs.replace("\n", ", ").rstrip(", ") + "]",
                                r"invalid YAML|expands to more than"),
        "override-deep-nesting": ("loramoe.task_names=" + "[" * 500 + "]" * 500, r"nested deeper than \d+ levels"),
    }  # fmt: skip
    for name, (arg, match) in override_bombs.items():
        case(f"config/{name}", "ConfigError", match, config=base, overrides=[arg], names="override")
    config_case("data-path-dev-zero", "data.sources", ["/dev/zero"], r"/dev/zero.*character device, not a regular file",
                error="DataError", names="/dev/zero")  # fmt: skip


# --- adapters ----------------------------------------------------------------------------------------------


def gen_adapters() -> None:
    sys.path.insert(0, str(HERE.parent))
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from loramoe import LoRAMoEConfig, inject
    from loramoe.adapter import save_adapter
    from loramoe.files import sha256_file
    from loramoe.inject import adapter_parameters

    from tiny import tiny_model

    root = OUT / "adapters"
    torch.manual_seed(0)
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    generator = torch.Generator().manual_seed(0)  # weights independent of the library's initialisation
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    good = root / "good"
    save_adapter(model, good, base_name_or_path="base")
    weights, config = good / "adapter_model.safetensors", good / "adapter_config.json"
    meta = json.loads(config.read_text())
    # safetensors writes several metadata keys in hash order; one key keeps the corpus's bytes reproducible
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    meta["weights_sha256"] = sha256_file(weights)
    config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def variant(name: str, error: str, match: str, *, model: str | None = None) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        extra = {"model": model} if model else {}
        case(f"adapter/{name}", error, match, adapter=f"{REL}/adapters/{name}", **extra)
        return folder

    def rewrite_meta(folder: Path, change) -> None:
        m = copy.deepcopy(meta)
        change(m)
        (folder / "adapter_config.json").write_text(json.dumps(m, indent=2))

    variant("different-base", "AdapterError", r"different base model.*intermediate_size", model="other")
    f = variant("different-base-recorded", "AdapterError", r"different base model.*hidden_size")
    rewrite_meta(f, lambda m: m["base_model"].update(hidden_size=4096))
    size = weights.stat().st_size
    for name, keep in {"truncated-half": size // 2, "truncated-header": 6, "truncated-one-byte": size - 1,
                       "empty-weights": 0}.items():  # fmt: skip
        f = variant(name, "AdapterError", r"adapter_model\.safetensors.*(checksum|truncated)")
        (f / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:keep])
    for name, keep in {"truncated-no-checksum": size // 2, "empty-no-checksum": 0}.items():
        f = variant(name, "AdapterError", r"adapter_config\.json field 'weights_sha256': missing")
        (f / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:keep])
        rewrite_meta(f, lambda m: m.pop("weights_sha256"))
    data = bytearray(weights.read_bytes())
    for name, offset in {"tampered-last-byte": len(data) - 1, "tampered-header-byte": 20}.items():
        f = variant(name, "AdapterError", r"checksum does not match")
        changed = bytearray(data)
        changed[offset] ^= 0x01
        (f / "adapter_model.safetensors").write_bytes(bytes(changed))
    f = variant("garbage-header", "AdapterError", r"not a readable safetensors")
    (f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" * 64)
    rewrite_meta(f, lambda m: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    # tensors that do not fit, with a matching checksum (a foreign or edited file, not a torn one)
    state = load_file(str(weights))
    edits = {
        "missing-tensor": lambda s: s.pop(sorted(s)[0]),
        "extra-tensor": lambda s: s.update({"model.layers.9.mlp.up_proj.lora_A": torch.zeros(2, 2, 32)}),
        "wrong-shape": lambda s: s.update({sorted(s)[0]: torch.zeros(3, 3)}),
    }
    for name, edit in edits.items():
        f = variant(name, "AdapterError", r"does not fit this model")
        s = dict(state)
        edit(s)
        save_file(s, str(f / "adapter_model.safetensors"), metadata={"format": "pt"})
        rewrite_meta(f, lambda m, f=f: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    # pickle files are refused (never unpickled: these would run code if they were)
    for name in ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"):
        f = variant(
            f"pickle-{name.replace('.', '-')}", "AdapterError", rf"{re.escape(name)}.*refusing.*pickle"
        )
        (f / "adapter_model.safetensors").unlink()
        (f / name).write_bytes(b"\x80\x04cposix\nsystem\nX\x0b\x00\x00\x00echo pwned\x85R.")
    f = variant("pickle-without-config", "AdapterError", r"adapter_model\.bin.*refusing.*pickle")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_config.json").unlink()
    (f / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    # the config
    f = variant("missing-config", "AdapterError", r"adapter_config\.json.*missing")
    (f / "adapter_config.json").unlink()
    f = variant("missing-weights", "AdapterError", r"adapter_model\.safetensors.*missing")
    (f / "adapter_model.safetensors").unlink()
    bad_configs = {
        "config-not-json": b"format: loramoe\n",
        "config-truncated-json": config.read_bytes()[:40],
        "config-empty": b"",
        "config-latin1": '{"format": "loramoe", "note": "é"}'.encode("latin-1"),
        "config-utf16": config.read_text().encode("utf-16"),
        "config-nan-garbage": b"NaNaN",
    }
    for name, content in bad_configs.items():
        f = variant(name, "AdapterError", r"adapter_config\.json.*not valid JSON")
        (f / "adapter_config.json").write_bytes(content)
    foreign = {
        "config-is-list": [meta],
        "config-wrong-format": {**meta, "format": "peft"},
        "config-no-format": {k: v for k, v in meta.items() if k != "format"},
        "config-config-not-object": {**meta, "config": "num_experts=2"},
    }
    for name, doc in foreign.items():
        f = variant(name, "AdapterError", r"adapter_config\.json.*not a loramoe adapter config")
        (f / "adapter_config.json").write_text(json.dumps(doc))
    invalid = {
        "config-invalid-experts": {"num_experts": 0},
        "config-invalid-odd-binary": {"num_experts": 3},
        "config-invalid-dropout": {"dropout": 2},
        "config-unknown-key": {"experts": 2},
        "config-task-names-number": {"task_names": 3},
        "config-task-names-nested": {"task_names": [["a"], ["b"]]},
    }
    for name, change in invalid.items():
        f = variant(name, "AdapterError", r"adapter_config\.json field 'config'")
        rewrite_meta(f, lambda m, change=change: m["config"].update(change))
    f = variant("config-base-model-not-object", "AdapterError", r"adapter_config\.json field 'base_model'")
    rewrite_meta(f, lambda m: m.update(base_model="llama"))
    f = variant("config-no-base-name", "AdapterError", r"does not name its base model")
    rewrite_meta(f, lambda m: m["base_model"].update(name_or_path=None))
    f = variant("config-base-not-found", "ConfigError", r"base model 'corpus/no_such_base'.*pass --model")
    rewrite_meta(f, lambda m: m["base_model"].update(name_or_path="corpus/no_such_base"))

    # folders that are not adapters
    (root / "empty-dir").mkdir()
    (root / "empty-dir" / ".keep").write_text("")
    case(
        "adapter/empty-dir",
        "AdapterError",
        r"empty-dir.*neither an adapter",
        adapter=f"{REL}/adapters/empty-dir",
    )
    case(
        "adapter/not-found",
        "AdapterError",
        r"no_such_adapter.*not found",
        adapter=f"{REL}/adapters/no_such_adapter",
    )
    case("adapter/is-a-file", "AdapterError", r"good/adapter_config\.json.*not found",
         adapter=f"{REL}/adapters/good/adapter_config.json")  # fmt: skip

    # the LoRA baseline (PEFT) and full fine-tuning outputs
    torch.manual_seed(0)
    base = tiny_model("llama")
    base.name_or_path = base.config._name_or_path = "base"
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["up_proj"], task_type="CAUSAL_LM"))
    peft_good = root / "peft-good"
    peft_model.save_pretrained(str(peft_good))
    (peft_good / "README.md").unlink(missing_ok=True)
    pmeta = json.loads((peft_good / "adapter_config.json").read_text())
    pmeta["base_model_name_or_path"] = "base"
    (peft_good / "adapter_config.json").write_text(json.dumps(pmeta, indent=2))

    def peft_variant(name: str, error: str, match: str) -> Path:
        folder = root / name
        shutil.copytree(peft_good, folder)
        case(f"adapter/{name}", error, match, adapter=f"{REL}/adapters/{name}")
        return folder

    f = peft_variant("peft-pickle-only", "AdapterError", r"adapter_model\.bin.*refusing.*pickle")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    f = peft_variant("peft-truncated", "AdapterError", r"peft-truncated.*cannot load")
    p = f / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    f = peft_variant("peft-no-base-name", "AdapterError", r"does not name its base model")
    (f / "adapter_config.json").write_text(json.dumps({**pmeta, "base_model_name_or_path": None}))
    f = peft_variant("peft-bad-rank", "AdapterError", r"peft-bad-rank.*cannot load")
    (f / "adapter_config.json").write_text(json.dumps({**pmeta, "r": "two"}))

    full = root / "full-truncated"
    tiny_model("llama").save_pretrained(str(full))
    p = full / "model.safetensors"
    p.write_bytes(p.read_bytes()[:4096])
    case(
        "adapter/full-truncated",
        "AdapterError",
        r"full-truncated.*cannot load",
        adapter=f"{REL}/adapters/full-truncated",
    )
    full_pickle = root / "full-pickle-only"
    full_pickle.mkdir()
    shutil.copy(full / "config.json", full_pickle / "config.json")
    (full_pickle / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    case("adapter/full-pickle-only", "AdapterError", r"pytorch_model\.bin.*refusing.*pickle",
         adapter=f"{REL}/adapters/full-pickle-only")  # fmt: skip
    full_bad_config = root / "full-bad-config"
    full_bad_config.mkdir()
    (full_bad_config / "config.json").write_text('{"model_type": "llama", ')
    shutil.copy(full / "model.safetensors", full_bad_config / "model.safetensors")
    case("adapter/full-bad-config", "AdapterError", r"full-bad-config.*cannot load",
         adapter=f"{REL}/adapters/full-bad-config")  # fmt: skip

    # --- class: pickle-format weights anywhere a loader reads weights, whatever else is beside them -----------
    evil = b"\x80\x04cposix\nsystem\nX\x0b\x00\x00\x00echo pwned\x85R."
    # a safetensors file the loader never reads
    decoy = {"unrelated.safetensors": good / "adapter_model.safetensors"}
    for name in ("adapter_model.bin", "pytorch_model.bin", "adapter_model-00001-of-00002.bin"):
        f = variant(f"pickle-beside-safetensors-{name.split('.')[0]}", "AdapterError",
                    rf"{re.escape(name)}.*refusing.*pickle")  # fmt: skip
        (f / "adapter_model.safetensors").unlink()
        shutil.copy(decoy["unrelated.safetensors"], f / "unrelated.safetensors")
        (f / name).write_bytes(evil)
    f = peft_variant(
        "peft-pickle-beside-safetensors", "AdapterError", r"adapter_model\.bin.*refusing.*pickle"
    )
    (f / "adapter_model.safetensors").rename(f / "unrelated.safetensors")
    (f / "adapter_model.bin").write_bytes(evil)
    fine = root / "full-good"
    tiny_model("llama").save_pretrained(str(fine))
    for name, files in {
        "full-pickle-beside-safetensors": ["pytorch_model.bin"],
        "full-sharded-pickle": ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
    }.items():
        f = root / name
        f.mkdir()
        shutil.copy(fine / "config.json", f / "config.json")
        shutil.copy(fine / "model.safetensors", f / "unrelated.safetensors")
        for file in files:
            (f / file).write_bytes(evil if file.endswith(".bin") else b'{"weight_map": {}}')
        case(f"adapter/{name}", "AdapterError", rf"{re.escape(sorted(files)[0])}.*refusing.*pickle",
             adapter=f"{REL}/adapters/{name}")  # fmt: skip
    shutil.rmtree(fine)
    f = variant(
        "base-is-pickle", "ConfigError", r"base model.*full-pickle-beside-safetensors.*refusing.*pickle"
    )
    rewrite_meta(
        f, lambda m: m["base_model"].update(name_or_path=f"{REL}/adapters/full-pickle-beside-safetensors")
    )

    # --- class: an adapter config or tensor that would load into a silently wrong model ------------------------
    for field in meta["config"]:
        f = variant(
            f"config-missing-{field}",
            "AdapterError",
            rf"adapter_config\.json field 'config\.{field}': missing",
        )
        rewrite_meta(f, lambda m, field=field: m["config"].pop(field))
    for key in ("model_type", "hidden_size", "name_or_path"):
        f = variant(f"config-missing-base-{key}", "AdapterError",
                    rf"adapter_config\.json field 'base_model\.{key}': missing")  # fmt: skip
        rewrite_meta(f, lambda m, key=key: m["base_model"].pop(key))
    f = variant("config-future-format", "AdapterError", r"adapter_config\.json field 'format_version'")
    rewrite_meta(f, lambda m: m.update(format_version=99))
    f = variant("config-checksum-not-hex", "AdapterError", r"field 'weights_sha256': must be a SHA-256")
    rewrite_meta(f, lambda m: m.update(weights_sha256="abc"))
    f = variant("config-nan-alpha", "AdapterError", r"adapter_config\.json.*not valid JSON.*NaN")
    (f / "adapter_config.json").write_text(json.dumps(meta).replace('"alpha": 32.0', '"alpha": NaN'))
    first = sorted(state)[0]
    tensors = {
        "tensor-int64": state[first].to(torch.int64),
        "tensor-int8": state[first].to(torch.int8),
        "tensor-bool": state[first] > 0,
        "tensor-nan": state[first].clone().fill_(float("nan")),
        "tensor-inf": torch.full_like(state[first], float("inf")),
    }
    for name, tensor in tensors.items():
        what = "floating-point tensor expected" if not tensor.is_floating_point() else "NaN or infinite"
        f = variant(name, "AdapterError", rf"does not fit this model.*{re.escape(first)}: .*{what}")
        save_file({**state, first: tensor}, str(f / "adapter_model.safetensors"), metadata={"format": "pt"})
        rewrite_meta(f, lambda m, f=f: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    f = variant("config-a-million-experts", "AdapterError", r"config.*num_experts=1000000.*more than 10x")
    rewrite_meta(f, lambda m: m["config"].update(num_experts=1_000_000))


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    gen_data()
    gen_configs()
    gen_adapters()
    for c in cases:
        if c["id"] in KNOWN_BUGS:
            c["known_bug"] = KNOWN_BUGS[c["id"]]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    (HERE / "generated_cases.json").write_text(json.dumps(cases, indent=1) + "\n", encoding="utf-8")
    print(f"{len(cases)} generated cases in {OUT}")


if __name__ == "__main__":
    main()
