"""Adapter files: save/load round trip, the file format, and every way a load must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError
from loramoe.inject import adapted_modules, adapter_parameters, get_config, inject

from tiny import tiny_model

IDS = torch.tensor([[5, 17, 200, 33, 9, 64, 128, 3]])
CFG = LoRAMoEConfig(
    num_experts=4, rank=2
)  # default dropout 0.05: eval-mode outputs must still be deterministic


def trained_llama(**model_overrides) -> torch.nn.Module:
    model = inject(tiny_model("llama", **model_overrides), CFG)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
            layer.loramoe_router.normal_(std=1.0)
            layer.loramoe_A.normal_(std=0.3)
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = trained_llama()
    return model, save_adapter(model, tmp_path / "adapter")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_unadapted(model: torch.nn.Module) -> None:
    assert not adapted_modules(model)
    assert not hasattr(model, "loramoe_config")


def test_save_then_load_gives_identical_logits(saved):
    model, path = saved
    loaded = load_adapter(tiny_model("llama"), path)
    assert get_config(loaded) == CFG
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.allclose(logits(loaded), logits(tiny_model("llama")), atol=1e-3)


def test_save_then_load_gpt2_conv1d_gives_identical_logits(tmp_path):
    model = inject(tiny_model("gpt2"), CFG)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
    loaded = load_adapter(tiny_model("gpt2"), save_adapter(model, tmp_path))
    assert torch.equal(logits(loaded), logits(model))


def test_safetensors_holds_exactly_the_documented_names_and_shapes(saved):
    model, path = saved
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    expected = {}
    for i in (0, 1):
        for proj, (d_in, d_out) in {
            "gate_proj": (32, 64),
            "up_proj": (32, 64),
            "down_proj": (64, 32),
        }.items():
            m = f"model.layers.{i}.mlp.{proj}"
            expected[f"{m}.lora_A"] = (4, 2, d_in)
            expected[f"{m}.lora_B"] = (4, d_out, 2)
            expected[f"{m}.router"] = (4, d_in)
    assert shapes == expected
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        layer = model.model.layers[1].mlp.down_proj
        assert torch.equal(f.get_tensor("model.layers.1.mlp.down_proj.lora_B"), layer.loramoe_B.detach())


def test_adapter_config_records_config_base_identity_and_checksum(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["format"] == "loramoe"
    assert LoRAMoEConfig.from_dict(meta["config"]) == CFG
    assert {k: meta["base_model"][k] for k in ("model_type", "hidden_size", "num_hidden_layers")} == {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
    }
    assert len(meta["weights_sha256"]) == 64


def test_save_leaves_no_temporary_files(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])


@pytest.mark.parametrize(
    ("model_type", "overrides", "mismatch"),
    [
        ("llama", {"hidden_size": 48}, "hidden_size"),
        ("mistral", {}, "model_type"),
        ("llama", {"num_hidden_layers": 3}, "num_hidden_layers"),
        ("llama", {"intermediate_size": 96}, "intermediate_size"),
    ],
)
def test_loading_into_a_different_base_is_an_adapter_error_naming_the_mismatch(
    saved, model_type, overrides, mismatch
):
    _, path = saved
    other = tiny_model(model_type, **overrides)
    with pytest.raises(AdapterError, match=mismatch):
        load_adapter(other, path)
    assert_unadapted(other)


def test_truncated_weights_are_an_adapter_error(saved):
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        load_adapter(tiny_model("llama"), path)


def test_a_config_without_the_checksum_is_refused_not_trusted(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    model = tiny_model("llama")
    with pytest.raises(AdapterError, match=r"field 'weights_sha256': missing"):
        load_adapter(model, path)
    assert_unadapted(model)


def test_one_tampered_byte_is_an_adapter_error(saved):
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # inside the tensor data: still a valid safetensors file, only the checksum can tell
    weights.write_bytes(bytes(data))
    model = tiny_model("llama")
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(model, path)
    assert_unadapted(model)


def test_pickle_only_adapter_is_refused_mentioning_pickle(saved):
    _, path = saved
    (path / WEIGHTS_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    model = tiny_model("llama")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(model, path)
    assert_unadapted(model)


def test_missing_config_is_an_adapter_error(saved):
    _, path = saved
    (path / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=CONFIG_NAME):
        load_adapter(tiny_model("llama"), path)


def test_missing_weights_are_an_adapter_error(saved):
    _, path = saved
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=WEIGHTS_NAME):
        load_adapter(tiny_model("llama"), path)


def test_missing_directory_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tiny_model("llama"), tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "JSON"),
        ('{"format": "peft", "config": {}}', "not a loramoe adapter"),
        ('{"format": "loramoe", "config": {"experts": 8}}', "experts"),
    ],
)
def test_damaged_or_foreign_config_is_an_adapter_error(saved, text, match):
    _, path = saved
    (path / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterError, match=match):
        load_adapter(tiny_model("llama"), path)


def test_load_keeps_the_adapter_frozen_unless_trainable(saved):
    _, path = saved
    frozen = load_adapter(tiny_model("llama"), path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(tiny_model("llama"), path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(
        adapter_parameters(trainable)
    )
    assert len(adapter_parameters(trainable)) == 18


def test_failed_load_leaves_the_model_without_loramoe_layers(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["config"]["rank"] = (
        3  # the tensors in the file have rank 2: fails after injection, at the shape check
    )
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    model = tiny_model("llama")
    originals = {name: module for name, module in model.named_modules()}
    expected = logits(model)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(model, path)
    assert_unadapted(model)
    assert {name: module for name, module in model.named_modules()} == originals
    assert torch.equal(logits(model), expected)


def test_adapter_saved_with_the_old_default_keeps_its_lbc_positions(tmp_path):
    old = LoRAMoEConfig(
        num_experts=4, rank=2, lbc_positions="all"
    )  # what every adapter before the new default has
    path = save_adapter(inject(tiny_model("llama"), old), tmp_path / "adapter")
    assert json.loads((path / CONFIG_NAME).read_text())["config"]["lbc_positions"] == "all"
    assert get_config(load_adapter(tiny_model("llama"), path)).lbc_positions == "all"


def test_adapter_config_of_format_2_loads_without_group_mass_weight(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 3
    del meta["config"]["group_mass_weight"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        AdapterError, match=r"field 'config.group_mass_weight': missing"
    ):  # format 3 requires it
        load_adapter(tiny_model("llama"), path)
    meta["format_version"] = 2  # written before the field existed: trained without the term
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    assert get_config(load_adapter(tiny_model("llama"), path)).group_mass_weight == 0.0


def test_adapter_config_without_lbc_positions_loads_as_all_positions(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    del meta["config"]["lbc_positions"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"field 'config.lbc_positions': missing"):  # format 3 requires it
        load_adapter(tiny_model("llama"), path)
    # a config written before the field existed: format 1, which defines it as "all"
    del meta["format_version"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    assert get_config(load_adapter(tiny_model("llama"), path)).lbc_positions == "all"
    assert (
        LoRAMoEConfig.from_dict(meta["config"]).lbc_positions == "non_padding"
    )  # a new config: the new default
