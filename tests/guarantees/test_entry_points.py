"""Guarantee 6 of docs/reliability.md: generate / chat / routing and the library entry points fail with
``loramoe.errors`` types.

Undecodable prompts and zero batch sizes are clear errors, a source ratio that rounds to zero samples is named,
and library misuse raises loramoe errors. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loramoe.adapter import load_adapter, save_adapter
from loramoe.cli import main
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, DataError
from loramoe.inject import disable_experts, inject
from loramoe.loss import compute_loss
from loramoe.models.base import load_base
from loramoe.routing import RouterRecorder

from guarantees_helpers import batch, cli_error, make_root
from tiny import tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


def test_undecodable_prompts_and_zero_batch_sizes_are_clear_errors(root, capsys):
    from loramoe.analysis.report import expert_usage
    from loramoe.data.formats import Example
    from loramoe.inference.chat import chat_loop
    from loramoe.inference.generate import generate

    model, tok = load_base(str(root / "base"))
    with pytest.raises(ConfigError, match=r"prompt 0 holds bytes that are not UTF-8"):
        generate(model, tok, ["caf\udce9"], progress=False)
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        generate(model, tok, ["hi"], batch_size=0, progress=False)
    with pytest.raises(ConfigError, match=r"prompts must be a list of strings"):
        generate(model, tok, "hi", progress=False)
    line = cli_error(capsys, ["generate", "--model", str(root / "base"), "--prompt", "caf\udce9"])
    assert "not UTF-8" in line
    inject(model, LoRAMoEConfig(num_experts=2, rank=2))
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        expert_usage(model, tok, [Example("a", "b", 0)], batch_size=0, progress=False)
    printed = []
    inputs = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "caf\udce9", EOFError()])

    def read(_prompt):
        item = next(inputs)
        if isinstance(item, BaseException):
            raise item
        return item

    chat_loop(
        model,
        tok,
        max_new_tokens=2,
        input_fn=read,
        print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))),
    )
    assert any("not valid utf-8 text; not sent" in p for p in printed), printed
    assert any("not UTF-8 text" in p and "not sent" in p for p in printed), printed


def test_a_ratio_that_rounds_to_zero_samples_is_named(root, tmp_path):
    from loramoe.data.sources import DataConfig, load_examples, mix_examples

    data = DataConfig.from_dict({"sources": [{"path": str(root / "good.jsonl"), "ratio": 0.9, "name": "big"},
                                             {"path": str(root / "good.jsonl"), "ratio": 0.004, "name": "tiny"}],
                                 "total_samples": 100})  # fmt: skip
    groups = [load_examples(s) for s in data.sources]
    with pytest.raises(
        ConfigError, match=r"source 'tiny': ratio 0.004 of total_samples 100 rounds to 0 samples"
    ):
        mix_examples(groups, data)


def test_library_misuse_raises_loramoe_errors(tmp_path):
    plain = tiny_model("llama")
    with pytest.raises(AdapterError, match="no LoRAMoE layers"), RouterRecorder(plain):
        pass
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(DataError, match="the batch is empty"):
        compute_loss(model, {**batch(B=0), "task_types": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(ConfigError, match="no LoRAMoE adapter"):
        save_adapter(plain, tmp_path / "out")


def test_an_empty_expert_selection_is_an_error_not_every_expert_on(root, capsys):
    """``--experts-off ""`` selects no expert: refused before the model loads, instead of analysing with all on."""
    argv = ["routing", "--adapter", str(root / "missing"), "--data", f"t={root / 'good.jsonl'}", "--out", "o"]
    line = cli_error(capsys, [*argv, "--experts-off", ""])
    assert "experts_off is empty" in line, line
    line = cli_error(capsys, [*argv, "--experts-off", " , "])
    assert "has an empty item" in line, line


WRONG = [None, 1, 1.5, True, "x", b"x", [], {}, object(), torch.zeros(2)]


def _misuse_calls(model, plain, adapter_dir):
    """Public name of ``loramoe`` -> calls with one argument of a wrong type or value (``v``)."""
    import loramoe as lm

    probs, types = torch.rand(2, 3, 2), torch.zeros(2, dtype=torch.long)
    lbc = dict(group_of_expert=[0, 1], delta=0.1, weight=1.0)
    ids = torch.randint(0, 100, (2, 4))
    linear = torch.nn.Linear(4, 4)
    return {
        "inject": [lambda v: lm.inject(v, lm.LoRAMoEConfig()), lambda v: lm.inject(tiny_model("llama"), v)],
        "adapted_modules": [lambda v: lm.adapted_modules(v)],
        "summary": [lambda v: lm.summary(v)],
        "disable_adapters": [lambda v: lm.disable_adapters(v).__enter__()],
        "disable_experts": [
            lambda v: lm.disable_experts(v, [0]).__enter__(),
            lambda v: lm.disable_experts(model, v).__enter__(),
        ],
        "save_adapter": [
            lambda v: lm.save_adapter(v, adapter_dir),
            lambda v: lm.save_adapter(model, v) if not isinstance(v, str) else lm.save_adapter(model, ""),
            lambda v: (
                lm.save_adapter(model, adapter_dir, tensors=v)
                if v is not None
                else lm.save_adapter(plain, "o")
            ),
        ],
        "load_adapter": [
            lambda v: lm.load_adapter(v, adapter_dir),
            lambda v: lm.load_adapter(tiny_model("llama"), v),
            lambda v: lm.load_adapter(tiny_model("llama"), adapter_dir, is_trainable=v),
            lambda v: lm.load_adapter(tiny_model("llama"), "org/name", revision=v if v is not None else ""),
        ],
        "RouterRecorder": [lambda v: lm.RouterRecorder(v).__enter__()],
        "compute_loss": [
            lambda v: lm.compute_loss(v, {"input_ids": ids, "labels": ids}),
            lambda v: lm.compute_loss(model, v),
            lambda v: lm.compute_loss(model, {"input_ids": v, "labels": ids}),
            lambda v: lm.compute_loss(model, {"input_ids": ids, "labels": v}),
            lambda v: lm.compute_loss(model, {"input_ids": ids, "labels": ids, "task_types": v}),
            lambda v: lm.compute_loss(
                model, {"input_ids": ids, "labels": ids, "task_types": types}, lbc_scale=v
            ),
        ],
        "localized_balancing_loss": [
            lambda v: lm.localized_balancing_loss(v, types, **lbc),
            lambda v: lm.localized_balancing_loss(probs, v, **lbc),
            lambda v: lm.localized_balancing_loss(probs, types, **{**lbc, "group_of_expert": v}),
            lambda v: lm.localized_balancing_loss(probs, types, **{**lbc, "delta": v}),
            lambda v: lm.localized_balancing_loss(probs, types, **{**lbc, "weight": v}),
            lambda v: lm.localized_balancing_loss(probs, types, **lbc, normalization=v),
            lambda v: lm.localized_balancing_loss(probs, types, **lbc, mask_BT=v if v is not None else 1),
        ],
        "LoRAMoEConfig": [lambda v: lm.LoRAMoEConfig(rank=v), lambda v: lm.LoRAMoEConfig.from_json(v)],
        "LoRAMoELinear": [
            lambda v: lm.LoRAMoELinear(v, num_experts=2, rank=2, alpha=1.0),
            *[
                lambda v, k=k: lm.LoRAMoELinear(linear, **{"num_experts": 2, "rank": 2, "alpha": 1.0, k: v})
                for k in ("num_experts", "rank", "alpha", "dropout", "dropout_mode")
            ],
            lambda v: lm.LoRAMoELinear(
                linear, num_experts=2, rank=2, alpha=1.0, top_k=v if v is not None else 3
            ),
            lambda v: lm.LoRAMoELinear(linear, num_experts=2, rank=2, alpha=1.0, dtype=v),
        ],
    }


def test_every_public_function_raises_a_loramoe_error_for_a_wrong_argument(tmp_path):
    """Each callable ``loramoe`` exports, given each wrong argument in turn (None, a number, a bool, a string,
    bytes, a list, a dict, an object, a tensor), raises a specific ``loramoe.errors`` type, never a bare
    TypeError, AttributeError or a library's ValueError from deep inside."""
    import loramoe as lm
    from loramoe.errors import LoRAMoEError

    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    save_adapter(model, tmp_path / "adapter")
    calls = _misuse_calls(model, tiny_model("llama"), tmp_path / "adapter")
    public = {name for name in lm.__all__ if callable(getattr(lm, name)) and not name.endswith("Error")} - {
        "LossParts"
    }  # a result record, built by compute_loss
    assert set(calls) == public, "give each public callable its misuse cases"
    for name, variants in calls.items():
        for i, call in enumerate(variants):
            refused = 0
            for value in WRONG:
                try:
                    call(value)
                except LoRAMoEError as err:
                    assert type(err) is not LoRAMoEError and "\n" not in str(err), (name, i, value, err)
                    refused += 1
                except Exception as err:  # noqa: BLE001 - the failure names what escaped
                    pytest.fail(f"{name} variant {i} with {value!r:.30}: {type(err).__name__}: {err}")
            assert refused >= len(WRONG) - 2, (name, i, refused)  # a value or two may be valid there


def test_disable_experts_with_no_selection_and_load_adapter_with_a_name(tmp_path):
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    save_adapter(model, tmp_path / "adapter")
    for group in (None, 1):
        with pytest.raises(ConfigError, match=r"disable_experts needs an expert group name .* got (None|1)"):
            disable_experts(model, group).__enter__()
    with pytest.raises(ConfigError, match=r"load_adapter\(\) needs a model .* got str; load the model first"):
        load_adapter("name", tmp_path / "adapter")
    with pytest.raises(
        AdapterError, match=r"^name: adapter directory not found \(and not a Hub repository id"
    ):
        load_adapter(tiny_model("llama"), "name")


def _results(label: str, score: object = 0.5, **task: object) -> dict:
    return {
        "schema": "loramoe.eval/1",
        "label": label,
        "config": {"adapter": None if label == "base" else "out"},
        "tasks": {"boolq": {"suite": "downstream", "metric": "acc", "score": score, "n": 10, **task}},
    }


def test_compare_refuses_a_damaged_results_file_with_one_line_naming_the_field(tmp_path, capsys):
    import json

    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    base.write_text(json.dumps(_results("base")))
    argv = ["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp"), "--no-plot"]
    tuned.write_text(json.dumps(_results("tuned", 0.75)))
    assert main(argv) == 0  # the control compares
    cases = {
        "nan-score": (json.dumps(_results("tuned", float("nan"))), r"field 'tasks\.boolq\.score': must be a finite"),
        "string-score": (json.dumps(_results("tuned", "0.7")), r"field 'tasks\.boolq\.score': must be a finite"),
        "bool-n": (json.dumps(_results("tuned", n=True)), r"field 'tasks\.boolq\.n': must be an integer >= 0"),
        "missing-suite": (json.dumps(_results("tuned", suite=None)), r"field 'tasks\.boolq\.suite': must be"),
        "missing-score": (json.dumps(_results("tuned")).replace('"score": 0.5, ', ""),
                          r"field 'tasks\.boolq\.score': must be a finite number, got nothing \(the field is missing"),
        "missing-label": (json.dumps({**_results("x"), "label": None}), r"field 'label': must be a non-empty"),
        "tasks-a-list": (json.dumps({**_results("x"), "tasks": []}), r"field 'tasks': must be an object"),
        "task-a-number": (json.dumps({**_results("x"), "tasks": {"t": 1}}), r"field 'tasks\.t': must be an object"),
        "config-missing": (json.dumps({k: v for k, v in _results("x").items() if k != "config"}),
                           r"field 'config': must be an object"),
        "not-utf8": (json.dumps(_results("tuné"), ensure_ascii=False).encode("latin-1"), r"not UTF-8"),
        "deep": ('{"schema": ' + "[" * 5000 + "]" * 5000 + "}", r"nested too deeply|nested deeper"),
        "key-twice": (json.dumps(_results("tuned")).replace('"n": 10', '"n": 10, "n": 11'),
                      r"field 'n': the key is given twice"),
        "long-integer": (json.dumps(_results("tuned")).replace('"n": 10', '"n": ' + "1" * 5000),
                         r"field 'tasks\.boolq\.n': an integer of 5000 digits"),
    }  # fmt: skip
    for name, (content, match) in cases.items():
        if isinstance(content, bytes):
            tuned.write_bytes(content)
        else:
            tuned.write_text(content)
        line = cli_error(capsys, argv)
        assert "tuned.json" in line and re.search(match, line), (name, line)
    for missing in (tmp_path / "nothing.json", tmp_path):
        line = cli_error(capsys, ["compare", str(base), str(missing), "--out", str(tmp_path / "cmp")])
        assert "no such results file" in line, line
