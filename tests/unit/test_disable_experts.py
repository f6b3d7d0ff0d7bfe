"""disable_experts: switching off an expert group (or any experts) at inference, the router renormalised over the
rest; compared with the per-expert loop whose probabilities of those experts are zeroed and renormalised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramoe import disable_experts
from loramoe.config import LoRAMoEConfig
from loramoe.errors import ConfigError
from loramoe.inject import adapted_modules, experts_spec, inject
from loramoe.routing import RouterRecorder

from reference import expert_loop_forward, expert_loop_topk_forward
from tiny import tiny_model

TOL = {"rtol": 1e-5, "atol": 1e-5}
IDS = torch.tensor([[5, 17, 200, 33, 9, 64, 128, 3], [7, 7, 1, 90, 41, 2, 8, 250]])


def adapted(**cfg) -> nn.Module:
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=6, rank=2, **cfg))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
            layer.loramoe_router.normal_(std=0.3)  # peaked but no probability underflows to 0
    return model.eval()


def layer_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input each adapted layer sees in a forward of IDS (captured with a pre-hook)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach()))
        for name, layer in adapted_modules(model).items()
    ]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(
    ("group", "off"), [("knowledge", (3, 4, 5)), ("downstream", (0, 1, 2)), ([1, 4], (1, 4)), ([5], (5,))]
)
def test_switch_equals_dense_forward_with_those_experts_zeroed_and_renormalised(group, off):
    model = adapted()
    inputs = layer_inputs(model)
    with disable_experts(model, group), torch.no_grad():
        for name, layer in adapted_modules(model).items():
            torch.testing.assert_close(
                layer(inputs[name]), expert_loop_forward(layer, inputs[name], off), **TOL
            )


def test_switch_with_top_k_routes_among_the_experts_left_on():
    model = adapted(top_k=2)
    inputs = layer_inputs(model)
    with disable_experts(model, "downstream"), torch.no_grad():
        for name, layer in adapted_modules(model).items():
            got = layer(inputs[name])
            torch.testing.assert_close(
                got, expert_loop_topk_forward(layer, inputs[name], 2, off=(0, 1, 2)), **TOL
            )


def test_switch_changes_the_output_and_is_undone_after_the_block_even_on_error():
    model = adapted()
    with torch.no_grad():
        before = model(IDS).logits
        with disable_experts(model, "knowledge"):
            during = model(IDS).logits
        with pytest.raises(RuntimeError), disable_experts(model, [0]):
            raise RuntimeError("inside")
        after = model(IDS).logits
    assert not torch.allclose(during, before, atol=1e-4)
    assert torch.equal(after, before)
    assert all(layer.experts_off is None for layer in adapted_modules(model).values())


def test_nested_switches_add_up_and_unwind_in_order():
    model = adapted()
    inputs = layer_inputs(model)
    name, layer = next(iter(adapted_modules(model).items()))
    with torch.no_grad(), disable_experts(model, [0]):
        with disable_experts(model, "knowledge"):
            torch.testing.assert_close(
                layer(inputs[name]), expert_loop_forward(layer, inputs[name], (0, 3, 4, 5)), **TOL
            )
        torch.testing.assert_close(layer(inputs[name]), expert_loop_forward(layer, inputs[name], (0,)), **TOL)


def test_recorded_router_probabilities_put_no_mass_on_experts_switched_off():
    model = adapted()
    with disable_experts(model, "downstream"), RouterRecorder(model, detach=True) as rec, torch.no_grad():
        model(IDS)
    for probs in rec.concat().values():
        assert torch.all(probs[..., :3] == 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_unknown_group_is_a_config_error_naming_the_groups():
    with (
        pytest.raises(ConfigError, match=r"unknown expert group 'facts'.*'downstream', 'knowledge'"),
        disable_experts(adapted(), "facts"),
    ):
        pass


@pytest.mark.parametrize("group", [[0, 1, 2, 3, 4, 5], list(range(6)) + [0]])
def test_every_expert_off_is_a_config_error(group):
    model = adapted()
    with pytest.raises(ConfigError, match="leaves no expert"), disable_experts(model, group):
        pass
    assert all(layer.experts_off is None for layer in adapted_modules(model).values())


def test_switching_off_the_rest_inside_a_switch_is_a_config_error_and_keeps_the_outer_switch():
    model = adapted()
    with disable_experts(model, "knowledge"):
        with pytest.raises(ConfigError, match="leaves none on"), disable_experts(model, "downstream"):
            pass
        assert all(
            layer.experts_off.tolist() == [False] * 3 + [True] * 3
            for layer in adapted_modules(model).values()
        )


@pytest.mark.parametrize("group", [[6], [-1], [], [True], ["0"]])
def test_bad_indices_are_a_config_error(group):
    with (
        pytest.raises(ConfigError, match=r"expert indices must be .* in \[0, 6\)"),
        disable_experts(adapted(), group),
    ):
        pass


def test_a_model_without_loramoe_is_a_config_error():
    with (
        pytest.raises(ConfigError, match="no LoRAMoE adapter"),
        disable_experts(tiny_model("llama"), "knowledge"),
    ):
        pass


@pytest.mark.parametrize(
    ("value", "parsed"), [("knowledge", "knowledge"), ("0,2", [0, 2]), (" 3 ", [3]), ([1, 4], [1, 4])]
)
def test_experts_spec_reads_a_group_name_or_indices(value, parsed):
    assert experts_spec(value) == parsed


@pytest.mark.parametrize("value", ["", "  ", [], [1.5], None])
def test_bad_experts_spec_is_a_config_error(value):
    with pytest.raises(ConfigError, match="experts_off"):
        experts_spec(value)


def test_eval_config_reads_experts_off():
    from loramoe.eval.evaluate import EvalConfig

    assert EvalConfig(experts_off="1,2").experts_off == [1, 2]
    assert EvalConfig(experts_off="downstream").experts_off == "downstream"
    with pytest.raises(ConfigError, match="experts_off"):
        EvalConfig(experts_off="")
