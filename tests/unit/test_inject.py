"""inject(): target resolution, wrapping without copying, freezing, disabling, summary; zero-init on every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramoe.config import LoRAMoEConfig
from loramoe.errors import ConfigError, TargetError
from loramoe.inject import (
    adapted_modules,
    adapter_parameters,
    count_parameters,
    disable_adapters,
    get_config,
    inject,
    summary,
)
from loramoe.layer import LoRAMoELinear, is_linear_like

from tiny import ARCHITECTURES, tiny_model

IDS = torch.tensor([[5, 17, 200, 33, 9, 64, 128, 3], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize_B(model: nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=std)


def mlp_linears(model: nn.Module) -> set[str]:
    """Every linear layer inside a decoder layer's ``mlp`` block (found independently of FFN_TARGETS)."""
    return {name for name, m in model.named_modules() if ".mlp." in name and is_linear_like(m)}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_zero_init_adapted_logits_equal_base_logits_exactly(model_type):
    model = tiny_model(model_type)
    with torch.no_grad():
        base_logits = model(IDS).logits
    expected_targets = mlp_linears(model)
    inject(model, LoRAMoEConfig())
    assert set(adapted_modules(model)) == expected_targets
    with torch.no_grad():
        adapted_logits = model(IDS).logits
    assert adapted_logits.dtype == torch.float32
    assert torch.equal(adapted_logits, base_logits)


def test_gpt2_default_targets_are_mlp_c_fc_and_c_proj_not_attn_c_proj():
    model = tiny_model("gpt2")
    inject(model, LoRAMoEConfig())
    assert set(adapted_modules(model)) == {
        f"transformer.h.{i}.mlp.{leaf}" for i in range(2) for leaf in ("c_fc", "c_proj")
    }
    assert not isinstance(model.transformer.h[0].attn.c_proj, LoRAMoELinear)


def test_gpt2_conv1d_wrapping_matches_base_then_changes_with_nonzero_B():
    model = tiny_model("gpt2")
    with torch.no_grad():
        base_logits = model(IDS).logits
    inject(model, LoRAMoEConfig(dropout=0.0))
    layer = model.transformer.h[0].mlp.c_fc
    assert type(layer.base_layer).__name__ == "Conv1D"
    assert (layer.in_features, layer.out_features) == (32, 64)
    randomize_B(model)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base_logits, atol=1e-3)
        with disable_adapters(model):
            assert torch.equal(model(IDS).logits, base_logits)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_base_weights_are_the_same_tensor_objects_after_inject(model_type):
    model = tiny_model(model_type)
    before = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    inject(model, LoRAMoEConfig())
    after = {
        name.replace(".base_layer.", "."): p for name, p in model.named_parameters() if "loramoe_" not in name
    }
    assert set(after) == set(before)
    for name, (param, ptr) in before.items():
        assert after[name] is param, name
        assert after[name].data_ptr() == ptr, name


def test_trainable_parameter_names_snapshot_tiny_llama():
    model = inject(tiny_model("llama"), LoRAMoEConfig())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.mlp.{proj}.loramoe_{kind}"
        for i in (0, 1)
        for proj in ("gate_proj", "up_proj", "down_proj")
        for kind in ("A", "B", "router")
    }
    assert set(adapter_parameters(model)) == trainable
    assert all(name.endswith(("loramoe_A", "loramoe_B", "loramoe_router")) for name in trainable)


def test_inject_freezes_the_base_and_counts_only_adapter_parameters():
    model = tiny_model("llama")
    total_base = sum(p.numel() for p in model.parameters())
    inject(model, LoRAMoEConfig(num_experts=4, rank=2))
    # per adapted linear: A (4, 2, d_in) + B (4, d_out, 2) + router (4, d_in); gate/up 32->64, down 64->32.
    per_layer = (4 * 2 * 32 + 4 * 64 * 2 + 4 * 32) * 2 + (4 * 2 * 64 + 4 * 32 * 2 + 4 * 64)
    trainable, total = count_parameters(model)
    assert trainable == 2 * per_layer
    assert total == total_base + trainable


def test_user_target_exact_full_name_adapts_only_that_module():
    model = inject(tiny_model("llama"), LoRAMoEConfig(target_modules=("model.layers.1.mlp.down_proj",)))
    assert list(adapted_modules(model)) == ["model.layers.1.mlp.down_proj"]


def test_user_target_leaf_name_matches_every_layer():
    model = inject(tiny_model("llama"), LoRAMoEConfig(target_modules=("down_proj", "q_proj")))
    assert set(adapted_modules(model)) == {
        f"model.layers.{i}.{name}" for i in (0, 1) for name in ("mlp.down_proj", "self_attn.q_proj")
    }


def test_user_target_dotted_suffix_matches_on_dot_boundaries_only():
    model = inject(tiny_model("gpt2"), LoRAMoEConfig(target_modules=("mlp.c_proj",)))
    assert set(adapted_modules(model)) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    model = tiny_model("llama")
    with pytest.raises(TargetError):
        inject(
            model, LoRAMoEConfig(target_modules=("own_proj",))
        )  # "down_proj" ends with it, but not at a dot


def test_zero_matches_is_a_target_error_listing_the_linears_seen():
    model = tiny_model("llama")
    with pytest.raises(TargetError) as err:
        inject(model, LoRAMoEConfig(target_modules=("fc1",)))
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert leaf in str(err.value)
    assert "fc1" in str(err.value)
    assert not adapted_modules(model)
    assert all(p.requires_grad for p in model.parameters())  # a failed inject changes nothing


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(8, 16)
        self.fc_out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.relu(self.fc_in(x)))


def test_unknown_architecture_without_targets_is_a_target_error():
    with pytest.raises(TargetError, match="fc_in"):
        inject(CustomNet(), LoRAMoEConfig())


def test_custom_module_with_explicit_targets_is_adapted():
    net = CustomNet()
    x = torch.randn(3, 8)
    expected = net(x)
    inject(net, LoRAMoEConfig(target_modules=("fc_in",), num_experts=2))
    assert list(adapted_modules(net)) == ["fc_in"]
    assert torch.equal(net(x), expected)


def test_double_inject_is_an_error():
    model = inject(tiny_model("llama"), LoRAMoEConfig())
    with pytest.raises(ConfigError, match="already"):
        inject(model, LoRAMoEConfig())


def test_inject_requires_a_loramoe_config():
    with pytest.raises(ConfigError):
        inject(tiny_model("llama"), {"num_experts": 8})


def test_inject_records_the_config_on_the_model():
    cfg = LoRAMoEConfig(num_experts=4)
    model = inject(tiny_model("llama"), cfg)
    assert get_config(model) is cfg
    with pytest.raises(ConfigError):
        get_config(tiny_model("llama"))


def test_layers_follow_the_models_train_eval_mode_at_inject():
    eval_model = inject(tiny_model("llama").eval(), LoRAMoEConfig())
    assert not any(layer.training for layer in adapted_modules(eval_model).values())
    train_model = inject(tiny_model("llama").train(), LoRAMoEConfig())
    assert all(layer.training for layer in adapted_modules(train_model).values())


def test_inject_into_eval_model_gives_deterministic_outputs_with_dropout():
    model = inject(tiny_model("llama"), LoRAMoEConfig(dropout=0.5))  # tiny_model is in eval mode
    randomize_B(model)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, model(IDS).logits)


def test_disable_adapters_gives_exactly_base_output_and_restores_state_nested():
    model = tiny_model("llama")
    with torch.no_grad():
        base_logits = model(IDS).logits
    inject(model, LoRAMoEConfig(dropout=0.0))
    randomize_B(model)
    with torch.no_grad():
        adapted_logits = model(IDS).logits
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
        with disable_adapters(model) as same:
            assert same is model
            assert torch.equal(model(IDS).logits, base_logits)
            with disable_adapters(model):
                assert torch.equal(model(IDS).logits, base_logits)
            assert torch.equal(model(IDS).logits, base_logits)  # the outer block still disables
        assert torch.equal(model(IDS).logits, adapted_logits)
    assert not any(layer.disabled for layer in adapted_modules(model).values())


def test_disable_adapters_restores_state_after_an_exception():
    model = inject(tiny_model("llama"), LoRAMoEConfig())
    layers = list(adapted_modules(model).values())
    layers[0].disabled = True  # a prior state that must come back exactly
    with pytest.raises(RuntimeError), disable_adapters(model):
        assert all(layer.disabled for layer in layers)
        raise RuntimeError("boom")
    assert [layer.disabled for layer in layers] == [True] + [False] * (len(layers) - 1)


def test_summary_mentions_targets_and_counts():
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=4, rank=2))
    text = summary(model)
    trainable, total = count_parameters(model)
    assert "llama" in text
    assert "6 adapted linears" in text
    assert "gate_proj x2" in text and "up_proj x2" in text and "down_proj x2" in text
    assert "experts 4 (2 downstream + 2 knowledge)" in text
    assert f"{trainable:,}" in text and f"{total:,}" in text
