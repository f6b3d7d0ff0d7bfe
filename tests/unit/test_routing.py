"""RouterRecorder: one record per adapted module per forward, nothing left behind; checkpointing; generation."""

from __future__ import annotations

import pytest
import torch

from loramoe.errors import TrainingError
from loramoe.inject import adapted_modules
from loramoe.loss import compute_loss
from loramoe.routing import RouterRecorder, group_mass, per_sample_mean, routing_sums

from tiny import adapted_llama, tiny_model

IDS = torch.tensor([[5, 17, 200, 33, 9, 64, 128], [1, 2, 3, 4, 5, 6, 7]])


def lm_batch() -> dict:
    return {
        "input_ids": IDS,
        "attention_mask": torch.ones_like(IDS),
        "labels": IDS.clone(),
        "task_types": torch.tensor([0, 1]),
    }


def hook_count(model) -> int:
    return sum(len(layer._router_hooks) for layer in adapted_modules(model).values())


def test_recorder_collects_one_record_per_module_per_forward():
    model = adapted_llama()
    with RouterRecorder(model) as rec:
        model(IDS)
        model(IDS[:1, :4])
    assert set(rec.probs) == set(adapted_modules(model))
    for records in rec.probs.values():
        assert [tuple(r.shape) for r in records] == [(2, 7, 8), (1, 4, 8)]
        assert all(r.dtype == torch.float32 for r in records)
        torch.testing.assert_close(records[0].sum(-1), torch.ones(2, 7), rtol=0, atol=1e-6)


def test_recorder_probs_equal_the_layers_router():
    model = adapted_llama()
    inputs = {}
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda mod, args: inputs.setdefault("x", args[0]))
    with RouterRecorder(model, detach=True) as rec:
        model(IDS)
    handle.remove()
    expected = torch.softmax(inputs["x"] @ layer.loramoe_router.T, dim=-1)
    torch.testing.assert_close(rec.probs["model.layers.1.mlp.down_proj"][0], expected, rtol=1e-5, atol=1e-6)


def test_recorder_leaves_no_hooks_behind():
    model = adapted_llama()
    with RouterRecorder(model):
        assert hook_count(model) == 6
        model(IDS)
    assert hook_count(model) == 0


def test_recorder_leaves_no_hooks_behind_after_an_exception():
    model = adapted_llama()
    with pytest.raises(RuntimeError, match="boom"), RouterRecorder(model):
        model(IDS)
        raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_nested_recorders_both_record_and_both_clean_up():
    model = adapted_llama()
    with RouterRecorder(model) as outer:
        with RouterRecorder(model) as inner:
            model(IDS)
        assert hook_count(model) == 6
        model(IDS)
    assert hook_count(model) == 0
    assert all(len(r) == 2 for r in outer.probs.values())
    assert all(len(r) == 1 for r in inner.probs.values())


def test_recorder_detach_option_controls_the_graph():
    model = adapted_llama()
    with RouterRecorder(model) as kept, RouterRecorder(model, detach=True) as detached:
        model(IDS)
    assert all(r[0].requires_grad for r in kept.probs.values())
    assert not any(r[0].requires_grad for r in detached.probs.values())


def test_recorder_on_a_model_without_loramoe_layers_is_an_error():
    with pytest.raises(ValueError, match="no LoRAMoE layers"), RouterRecorder(tiny_model("llama")):
        pass


def router_grads(model) -> dict[str, torch.Tensor]:
    return {name: layer.loramoe_router.grad.clone() for name, layer in adapted_modules(model).items()}


@pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing.*deprecated:FutureWarning")
def test_non_reentrant_checkpointing_keeps_one_record_and_the_lbc_gradient():
    model = adapted_llama(lbc_weight=0.5, lbc_delta=0.2).train()
    batch = lm_batch()

    compute_loss(model, batch).lbc.backward()
    plain = router_grads(model)
    model.zero_grad()

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    compute_loss(model, batch).lbc.backward()
    checkpointed = router_grads(model)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)

    # Backward recomputes every checkpointed forward; those recomputations are not new records.
    with RouterRecorder(model) as rec:
        out = model(**{k: v for k, v in batch.items() if k != "task_types"})
        out.loss.backward()
    assert all(len(records) == 1 for records in rec.probs.values())


@pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing.*deprecated:FutureWarning")
def test_reentrant_checkpointing_is_a_training_error():
    model = adapted_llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(TrainingError, match="use_reentrant"):
        compute_loss(model, lm_batch())


def test_generate_with_cache_records_prompt_then_one_token_per_step():
    model = adapted_llama()
    prompt = IDS[:1, :5]
    with RouterRecorder(model, detach=True) as rec, torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            use_cache=True,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape == (1, 8)
    # Forwards: the 5-token prompt, then one step per generated token except the last (never fed back in).
    steps = rec.probs["model.layers.0.mlp.gate_proj"]
    assert [r.shape[1] for r in steps] == [5, 1, 1]
    generated = rec.concat()

    with RouterRecorder(model, detach=True) as full, torch.no_grad():
        model(out[:, :-1], use_cache=False)
    for name, probs in full.concat().items():
        assert generated[name].shape == (1, 5 + 3 - 1, 8)
        torch.testing.assert_close(generated[name], probs, rtol=0, atol=1e-5)


def test_group_mass_is_the_mean_mass_per_group_and_rows_sum_to_one():
    probs = torch.softmax(torch.randn(3, 4, 6), -1)
    groups = [0, 0, 1, 1, 1, 2]
    mass = group_mass(probs, groups)
    expected = torch.stack([probs[..., :2].sum(-1), probs[..., 2:5].sum(-1), probs[..., 5]], -1).mean(1)
    torch.testing.assert_close(mass, expected)
    torch.testing.assert_close(mass.sum(-1), torch.ones(3))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    masked = group_mass(probs, groups, mask)
    torch.testing.assert_close(masked[0], expected_row(probs[0, :2], groups))
    torch.testing.assert_close(masked[2], expected_row(probs[2, :1], groups))


def expected_row(probs_TN: torch.Tensor, groups: list[int]) -> torch.Tensor:
    per_group = [
        sum(probs_TN[:, n] for n in range(len(groups)) if groups[n] == k) for k in range(max(groups) + 1)
    ]
    return torch.stack(per_group, -1).mean(0)


def test_routing_sums_add_up_per_task_type_without_leaving_the_device():
    probs = {"a": torch.softmax(torch.randn(3, 4, 4), -1), "b": torch.softmax(torch.randn(3, 4, 4), -1)}
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    types = torch.tensor([0, 1, 1])
    sums = routing_sums(probs, types, group_of_expert=[0, 0, 1, 1], num_types=3, mask_BT=mask)
    assert sums["count"].tolist() == [1, 2, 0]  # a type absent from the batch counts 0
    mass_BG = torch.stack([group_mass(p, [0, 0, 1, 1], mask) for p in probs.values()]).mean(0)
    torch.testing.assert_close(sums["mass"][0], mass_BG[0])
    torch.testing.assert_close(sums["mass"][1], mass_BG[1] + mass_BG[2])
    torch.testing.assert_close(sums["mass"].sum(-1), sums["count"])  # each sample's masses sum to 1
    entropy_BT = torch.stack([-(p * p.log()).sum(-1) for p in probs.values()]).mean(0)
    expected = [entropy_BT[0].mean(), entropy_BT[1, :2].mean() + entropy_BT[2, :1].mean()]
    torch.testing.assert_close(sums["entropy"][:2], torch.stack(expected))
    assert 0 < sums["entropy"][0] <= torch.log(torch.tensor(4.0)) + 1e-6


def test_per_sample_mean_leaves_masked_positions_out():
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert per_sample_mean(values, mask).tolist() == [2.0, 4.0]
    assert per_sample_mean(values).tolist() == pytest.approx([104 / 3, 4.0])
    assert per_sample_mean(values.unsqueeze(-1).expand(2, 3, 2), mask).tolist() == [[2.0, 2.0], [4.0, 4.0]]
