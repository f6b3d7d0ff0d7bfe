"""Bad configs for the corpus: wrong types and out-of-range values for every ``LoRAMoEConfig``, LoRA, ``RunConfig``,
``DataConfig``, ``SourceConfig`` and common ``TrainingArguments`` field, unknown keys, YAML that is not YAML or not a
mapping, bad overrides, settings that would fail only once training starts, and unbounded parsing (alias bombs, deep
nesting, duplicated keys, ``/dev/zero``).
"""

from __future__ import annotations

from typing import Any

import yaml

from corpus_cases import BASE_CONFIG, OUT, REL, case, with_value, write_config


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
        "group_mass_weight": [-1, "0.1", None, float("nan"), float("inf")],
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
        "late-optimizer-package": ("training.optim", "schedule_free_adamw", r"training\.optim:.*schedulefree"),
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
    # --- class: values (integers too long to read, in any base, in files and overrides) ----------------------
    long = "1" * 5000  # past Python's 4,300-digit limit on int(str)
    other = yaml.safe_dump({k: v for k, v in BASE_CONFIG.items() if k != "loramoe"})
    long_values = {
        "yaml-long-integer": (f"loramoe: {{rank: {long}}}\n" + other, r":1: invalid YAML \(an integer of 5000 digits"),
        "yaml-long-hex-integer": (other + f"seed: 0x{long}\n", r":\d+: invalid YAML \(an integer of 5000 digits"),
        "yaml-long-integer-key": (other + f"? {long}\n: 1\n", r":\d+: invalid YAML \(an integer of 5000 digits"),
    }  # fmt: skip
    for name, (text, match) in long_values.items():
        case(
            f"config/{name}",
            "ConfigError",
            rf"{name}\.yaml.*{match}",
            config=write_config(name, None, raw=text),
        )
    long_overrides = {
        "override-long-integer": f"loramoe.rank={long}",
        "override-long-list": f"loramoe.task_names=[a, {long}]",
        "override-long-index": f"data.sources.{long}.path=x.jsonl",
    }
    for name, arg in long_overrides.items():
        case(f"config/{name}", "ConfigError", r"an integer of 5000 digits", config=base, overrides=[arg],
             names="override")  # fmt: skip
    config_case("data-path-dev-zero", "data.sources", ["/dev/zero"], r"/dev/zero.*character device, not a regular file",
                error="DataError", names="/dev/zero")  # fmt: skip
