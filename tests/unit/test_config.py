"""LoRAMoEConfig: validation (one error per rule), JSON round trip, derived properties."""

from __future__ import annotations

import dataclasses
import json

import pytest

from loramoe.config import FFN_TARGETS, LoRAMoEConfig, field_docs
from loramoe.errors import ConfigError


def test_defaults_are_the_reference_hyperparameters():
    cfg = LoRAMoEConfig()
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.dropout) == (8, 4, 32.0, 0.05)
    assert cfg.dropout_mode == "per_expert"
    assert (cfg.lbc_normalization, cfg.lbc_reduction) == ("cv2", "sum")
    # the one default that is not the reference's: the LBC counts real tokens, not padding
    assert cfg.lbc_positions == "non_padding"
    assert cfg.top_k is None
    assert cfg.scaling == 8.0


def test_config_json_round_trip_is_identity():
    cfg = LoRAMoEConfig(
        num_experts=6,
        rank=2,
        alpha=7.5,
        dropout=0.2,
        dropout_mode="shared",
        target_modules=["up_proj", "mlp.down_proj"],
        top_k=3,
        lbc_delta=0.3,
        lbc_weight=0.5,
        lbc_normalization="var_over_mean",
        lbc_reduction="mean",
        lbc_positions="non_padding",
        task_names=["a", "b", "c"],
        expert_groups=[2, 3, 1],
    )
    text = cfg.to_json()
    assert json.loads(text)["expert_groups"] == [2, 3, 1]
    again = LoRAMoEConfig.from_json(text)
    assert again == cfg
    assert again.target_modules == ("up_proj", "mlp.down_proj")  # lists from JSON become tuples
    assert hash(again) == hash(cfg)


def test_default_config_round_trips_through_dict():
    cfg = LoRAMoEConfig()
    assert LoRAMoEConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="num_expert"):
        LoRAMoEConfig.from_dict({"num_expert": 8})


def test_non_mapping_config_is_a_config_error():
    with pytest.raises(ConfigError, match="mapping"):
        LoRAMoEConfig.from_dict([1, 2])


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        LoRAMoEConfig(rank=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2.0}, "num_experts"),
        ({"num_experts": True}, "num_experts"),
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": "32"}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout_mode": "per_token"}, "dropout_mode"),
        ({"lbc_normalization": "cv"}, "lbc_normalization"),
        ({"lbc_reduction": "max"}, "lbc_reduction"),
        ({"lbc_positions": "answer"}, "lbc_positions"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 9}, "top_k"),
        ({"lbc_delta": 1.0}, "lbc_delta"),
        ({"lbc_delta": -0.1}, "lbc_delta"),
        ({"lbc_weight": -0.1}, "lbc_weight"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["up_proj", ""]}, "target_modules"),
        ({"task_names": ["only"]}, "task_names"),
        ({"task_names": ["a", "a"]}, "task_names"),
        ({"task_names": ["a", "b", "c"]}, "expert_groups"),
        ({"expert_groups": [4, 4, 0], "task_names": ["a", "b", "c"]}, "expert_groups"),
        ({"expert_groups": [4, 3]}, "num_experts=8"),
        ({"expert_groups": [8]}, "task_names"),
    ],
)
def test_each_invalid_value_is_a_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LoRAMoEConfig(**kwargs)


def test_odd_num_experts_in_binary_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="odd"):
        LoRAMoEConfig(num_experts=7)


def test_odd_num_experts_with_explicit_groups_is_allowed():
    cfg = LoRAMoEConfig(num_experts=7, expert_groups=(3, 4))
    assert cfg.group_of_expert() == [0, 0, 0, 1, 1, 1, 1]


def test_binary_groups_are_two_halves_downstream_first():
    cfg = LoRAMoEConfig(num_experts=8)
    assert cfg.task_names == ("downstream", "knowledge")
    assert cfg.group_sizes == (4, 4)
    assert cfg.group_of_expert() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_k_type_groups_are_contiguous_in_order():
    cfg = LoRAMoEConfig(num_experts=6, task_names=("a", "b", "c"), expert_groups=(2, 3, 1))
    assert cfg.group_of_expert() == [0, 0, 1, 1, 1, 2]


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRAMoEConfig().rank = 8  # type: ignore[misc]


def test_every_field_has_a_documented_description():
    docs = field_docs()
    for f in dataclasses.fields(LoRAMoEConfig):
        assert docs.get(f.name), f"field {f.name} has no description in the class docstring"


def test_gpt2_default_targets_are_the_mlp_linears_only():
    assert FFN_TARGETS["gpt2"] == ("mlp.c_fc", "mlp.c_proj")
