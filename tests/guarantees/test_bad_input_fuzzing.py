"""Never crash on bad input, fuzzed: hypothesis feeds the record parsers (``parse_records``, ``read_records``) and
the config validation (``LoRAMoEConfig.from_dict``, ``RunConfig.from_dict``), which raise nothing but loramoe
errors.
"""

from __future__ import annotations

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loramoe.errors as errors
from loramoe.config import LoRAMoEConfig
from loramoe.data.formats import parse_records
from loramoe.data.records import read_records
from loramoe.errors import LoRAMoEError
from loramoe.training.run_config import RunConfig

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
record_keys = st.sampled_from(
    ["instruction", "input", "output", "question", "answer", "answers", "prompt", "completion", "messages",
     "task_type", "role", "content", "value", "x"]
)  # fmt: skip
records = st.dictionaries(record_keys, json_values | st.text(max_size=5), max_size=5) | json_values
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(rows=st.lists(records, max_size=4), fmt=st.sampled_from(["auto", "alpaca", "qa", "messages", "chat", "csv"]),
       task_type=st.none() | st.integers(0, 1), skip=st.booleans())  # fmt: skip
def test_parse_records_raises_only_loramoe_errors(rows, fmt, task_type, skip):
    try:
        examples, _, _ = parse_records(
            [("f.jsonl", i + 1, r) for i, r in enumerate(rows)],
            task_names=("downstream", "knowledge"),
            fmt=fmt,
            task_type=task_type,
            skip_invalid=skip,
        )
    except LoRAMoEError:
        return
    assert all(e.answer.strip() and e.prompt.strip() and e.task_type in (0, 1) for e in examples)


@FUZZ
@given(data=st.binary(max_size=200) | st.lists(records, max_size=4).map(lambda r: json.dumps(r).encode()),
       cut=st.integers(0, 200), skip=st.booleans())  # fmt: skip
def test_read_records_raises_only_loramoe_errors(tmp_path_factory, data, cut, skip):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data[: cut or None])
    try:
        rows, _ = read_records(path, skip_invalid=skip)
        parse_records(rows, task_names=("downstream", "knowledge"), skip_invalid=skip)
    except LoRAMoEError:
        pass


LORAMOE_FIELDS = [f for f in LoRAMoEConfig.__dataclass_fields__] + ["bogus"]


@FUZZ
@given(st.dictionaries(st.sampled_from(LORAMOE_FIELDS), json_values, max_size=4))
def test_loramoe_config_from_dict_raises_only_config_errors(data):
    try:
        cfg = LoRAMoEConfig.from_dict(data)
    except errors.ConfigError:
        return
    assert LoRAMoEConfig.from_json(cfg.to_json()) == cfg


@FUZZ
@given(
    top=st.dictionaries(
        st.sampled_from(["model", "method", "dtype", "lora", "bogus"]), json_values, max_size=2
    ),
    loramoe=st.dictionaries(st.sampled_from(LORAMOE_FIELDS), json_values, max_size=2),
    data=st.dictionaries(
        st.sampled_from(["max_length", "seed", "template", "val_size", "total_samples", "x"]),
        json_values,
        max_size=2,
    ),  # fmt: skip
    source=st.dictionaries(
        st.sampled_from(
            [
                "path",
                "format",
                "task_type",
                "num_samples",
                "ratio",
                "columns",
                "skip_invalid",
                "name",
                "split",
            ]
        ),
        json_values,
        max_size=2,
    ),  # fmt: skip
    training=st.dictionaries(
        st.sampled_from(
            [
                "learning_rate",
                "max_steps",
                "seed",
                "save_steps",
                "bf16",
                "lr_scheduler_type",
                "per_device_train_batch_size",
                "output_dir",
                "num_train_epochs",
                "warmup_steps",
                "optim",
            ]
        ),
        json_values,
        max_size=2,
    ),  # fmt: skip
)
def test_run_config_from_dict_raises_only_config_errors(top, loramoe, data, source, training):
    raw = {
        "loramoe": loramoe,
        "data": {"sources": [{"path": "x.jsonl", **source}], **data},
        "training": {"output_dir": "/nonexistent/out", **training},
        **top,
    }
    with contextlib.suppress(errors.ConfigError):
        RunConfig.from_dict(raw)
