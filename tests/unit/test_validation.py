"""One validation style: a bool is never an integer, in a config file or in a library call, and every integer
check says what it needs the same way."""

from __future__ import annotations

import pytest

from loramoe.config import LoRAMoEConfig
from loramoe.data.dataset import DataCollatorForLoRAMoE, ExampleEncoder
from loramoe.data.formats import resolve_task_type
from loramoe.errors import ConfigError, DataError, LoRAMoEError
from loramoe.eval.engine import Task
from loramoe.validation import integer, is_int, is_number, list_of, number, optional, text

from tiny import adapted_llama, tiny_tokenizer


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_neither_an_integer_nor_a_number(value):
    assert not is_int(value) and not is_number(value)
    assert not integer()[0](value) and not number()[0](value)
    assert not list_of(integer())[0]([1, value])


def test_one_of_numbers_takes_neither_a_bool_nor_a_float_for_an_int():
    from loramoe.validation import one_of

    ok, _ = one_of([1, 2])
    assert ok(1) and ok(2) and not ok(True) and not ok(1.0) and not ok("1")
    assert one_of(["a", None])[0](None) and not one_of(["a"])[0](["a"])  # unhashable values are just refused


def test_list_of_checks_each_item_the_length_and_distinctness():
    ok, need = list_of(text(), at_least=2, distinct=True)
    assert ok(["a", "b"]) and ok(("a", "b"))
    assert not ok(["a"]) and not ok(["a", "a"]) and not ok(["a", ""]) and not ok("ab") and not ok(None)
    assert need == "a list of at least 2 items, all different, each a non-empty string"
    assert optional(list_of(text()))[0](None)


def _routing(batch_size=1, max_examples=None):
    from loramoe.analysis.report import expert_usage, routing_report

    if max_examples is not None:
        return routing_report(
            adapted_llama(), tiny_tokenizer(), {"t": []}, "unused", max_examples=max_examples
        )
    return expert_usage(adapted_llama(), tiny_tokenizer(), [], batch_size=batch_size)


# Every place outside inference/ and serve/ that takes an integer: what it is called and how to give it True.
BOOLEAN_INTEGERS = {
    "LoRAMoEConfig.rank": ("rank", lambda v: LoRAMoEConfig(rank=v)),
    "LoRAMoEConfig.top_k": ("top_k", lambda v: LoRAMoEConfig(top_k=v)),
    "LoRAMoEConfig.expert_groups": (
        "expert_groups",
        lambda v: LoRAMoEConfig(num_experts=2, expert_groups=[v, 1]),
    ),
    "Task.max_new_tokens": ("max_new_tokens", lambda v: Task("contains", max_new_tokens=v)),
    "ExampleEncoder.max_length": ("max_length", lambda v: ExampleEncoder(tiny_tokenizer(), max_length=v)),
    "DataCollatorForLoRAMoE.pad_to_multiple_of": (
        "pad_to_multiple_of",
        lambda v: DataCollatorForLoRAMoE(tiny_tokenizer(), pad_to_multiple_of=v),
    ),
    "expert_usage batch_size": ("batch_size", lambda v: _routing(batch_size=v)),
    "routing_report max_examples": ("max_examples", lambda v: _routing(max_examples=v)),
}


@pytest.mark.parametrize("site", list(BOOLEAN_INTEGERS))
def test_true_is_refused_where_an_integer_is_needed_with_the_field_named(site):
    field, build = BOOLEAN_INTEGERS[site]
    with pytest.raises(ConfigError, match=rf"{field} must be .*integer.*, got \(?True"):
        build(True)


def test_true_is_not_a_task_type_an_expert_index_or_a_run_index():
    from loramoe.eval.report import _base_index
    from loramoe.inject import disable_experts, experts_spec

    with pytest.raises(DataError):
        resolve_task_type(True, ("downstream", "knowledge"))
    with pytest.raises(ConfigError, match="expert indices"), disable_experts(adapted_llama(), [True]):
        pass
    with pytest.raises(ConfigError, match="experts_off"):
        experts_spec([True])
    runs = [{"config": {"adapter": "a"}}, {"config": {"adapter": "b"}}]
    with pytest.raises(ConfigError, match="base True"):
        _base_index(runs, ["a", "b"], True)
    assert _base_index(runs, ["a", "b"], 1) == 1


def test_every_validation_error_is_a_loramoe_error():
    with pytest.raises(LoRAMoEError):
        Task("contains", max_new_tokens=0)
