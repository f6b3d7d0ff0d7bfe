"""The localized balancing constraint against the step-by-step reference, its optimum, and compute_loss."""

from __future__ import annotations

import pytest
import torch

from loramoe.config import LoRAMoEConfig
from loramoe.errors import DataError
from loramoe.inject import adapted_modules, adapter_parameters, inject
from loramoe.loss import (
    check_task_types,
    compute_loss,
    group_mass_loss,
    lbc_coefficients,
    localized_balancing_loss,
)
from loramoe.routing import RouterRecorder

from reference import lbc_coefficient, reference_lbc, reference_lbc_over_layers
from tiny import adapted_llama, tiny_model

# float32 library vs float64 Python reference on O(1) values.
TOL = {"rtol": 1e-5, "atol": 1e-7}


def random_probs(b: int, t: int, n: int, scale: float = 2.0) -> torch.Tensor:
    return torch.softmax(torch.randn(b, t, n) * scale, dim=-1)


def make_batch(b: int = 4, t: int = 7, *, padded: bool = False, task_types=(0, 1, 1, 0)) -> dict:
    ids = torch.randint(3, 300, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    if padded:
        mask[1, -3:] = 0
        mask[2, -1:] = 0
        ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if task_types is not None:
        batch["task_types"] = torch.tensor(task_types)
    return batch


@pytest.mark.parametrize("delta", [0.0, 0.1, 0.6])
def test_lbc_coefficients_follow_the_reference_rule(delta):
    types = torch.tensor([0, 1, 1, 0])
    cfg = LoRAMoEConfig(num_experts=8)
    coef = lbc_coefficients(types, cfg.group_of_expert(), delta)
    expected = torch.tensor([[lbc_coefficient(int(y), n, 8, delta) for n in range(8)] for y in types])
    assert coef.dtype == torch.float32
    torch.testing.assert_close(coef, expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("normalization", ["cv2", "var_over_mean"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_positions", "non_padding"])
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5])
def test_lbc_equals_reference_on_random_tensors(normalization, masked, delta):
    probs = random_probs(3, 5, 8)
    types = torch.tensor([1, 0, 1])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]) if masked else None
    got = localized_balancing_loss(
        probs,
        types,
        group_of_expert=LoRAMoEConfig().group_of_expert(),
        delta=delta,
        weight=0.7,
        normalization=normalization,
        mask_BT=mask,
    )
    expected = reference_lbc(
        probs, types.tolist(), delta=delta, beta=0.7, normalization=normalization, mask=mask
    )
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), **TOL)


def test_lbc_with_k_types_and_explicit_groups_equals_reference():
    cfg = LoRAMoEConfig(num_experts=6, task_names=("a", "b", "c"), expert_groups=(2, 3, 1))
    probs = random_probs(5, 4, 6)
    types = torch.tensor([0, 1, 2, 1, 2])
    got = localized_balancing_loss(probs, types, group_of_expert=cfg.group_of_expert(), delta=0.3, weight=1.0)
    expected = reference_lbc(probs, types.tolist(), delta=0.3, beta=1.0, expert_groups=(2, 3, 1))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), **TOL)


def test_lbc_of_bf16_probs_is_computed_in_float32():
    probs = random_probs(2, 6, 8)
    types = torch.tensor([0, 1])
    groups = LoRAMoEConfig().group_of_expert()
    got = localized_balancing_loss(probs.bfloat16(), types, group_of_expert=groups, delta=0.1, weight=1.0)
    expected = reference_lbc(probs.bfloat16().float(), [0, 1], delta=0.1, beta=1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), **TOL)


@pytest.mark.parametrize("delta", [0.0, 0.1, 0.5])
def test_perfectly_balanced_routing_gives_zero_loss(delta):
    # Every token routes proportionally to 1 / C: Q = C^-1 * T inside each sample, so Z = C * Q is constant.
    types = torch.tensor([0, 1, 1])
    groups = LoRAMoEConfig().group_of_expert()
    inv_coef = 1 / lbc_coefficients(types, groups, delta)  # (B, N)
    probs = (inv_coef / inv_coef.sum(-1, keepdim=True)).unsqueeze(1).expand(3, 6, 8)
    for normalization in ("cv2", "var_over_mean"):
        loss = localized_balancing_loss(
            probs, types, group_of_expert=groups, delta=delta, weight=1.0, normalization=normalization
        )
        torch.testing.assert_close(loss, torch.tensor(0.0), rtol=0, atol=1e-10)


def test_imbalanced_routing_gives_positive_loss():
    probs = torch.zeros(2, 3, 8)
    probs[..., 0] = 1.0  # everything on expert 0
    loss = localized_balancing_loss(
        probs, torch.tensor([0, 1]), group_of_expert=LoRAMoEConfig().group_of_expert(), delta=0.0, weight=1.0
    )
    assert loss > 1.0


def test_compute_loss_adds_the_group_mass_term_only_when_its_weight_is_set():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 100, (2, 5)), "task_types": torch.tensor([0, 1])}
    batch["labels"] = batch["input_ids"].clone()
    totals = {}
    for gamma in (0.0, 0.5):
        torch.manual_seed(1)
        model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=4, rank=2, group_mass_weight=gamma))
        model.train()
        parts = compute_loss(model, dict(batch))
        totals[gamma] = (parts.lm, parts.lbc, parts.router_probs)
    lm0, lbc0, probs = totals[0.0]
    lm1, lbc1, _ = totals[0.5]
    torch.testing.assert_close(lm0, lm1)
    extra = sum(
        group_mass_loss(p, batch["task_types"], group_of_expert=[0, 0, 1, 1], weight=0.5)
        for p in probs.values()
    )
    torch.testing.assert_close(lbc1, lbc0 + extra)


@pytest.mark.parametrize(
    ("normalization", "reduction", "positions"),
    [
        ("cv2", "sum", "all"),
        ("cv2", "mean", "all"),
        ("var_over_mean", "sum", "all"),
        ("cv2", "sum", "non_padding"),
        ("var_over_mean", "mean", "non_padding"),
    ],
)
def test_compute_loss_lbc_equals_reference_summed_over_layers(normalization, reduction, positions):
    model = adapted_llama(
        lbc_delta=0.2,
        lbc_weight=0.3,
        lbc_normalization=normalization,
        lbc_reduction=reduction,
        lbc_positions=positions,
    )
    batch = make_batch(padded=True)
    with RouterRecorder(model, detach=True) as rec:
        parts = compute_loss(model, batch)
    probs = rec.concat()
    assert len(probs) == 6 and all(p.shape == (4, 7, 8) for p in probs.values())
    expected = reference_lbc_over_layers(
        probs,
        reduction,
        task_types=batch["task_types"].tolist(),
        delta=0.2,
        beta=0.3,
        normalization=normalization,
        mask=batch["attention_mask"] if positions == "non_padding" else None,
    )
    torch.testing.assert_close(parts.lbc, torch.tensor(expected, dtype=torch.float32), **TOL)
    assert parts.lbc > 0
    assert torch.equal(parts.total, parts.lm + parts.lbc)
    assert set(parts.router_probs) == set(probs)


def test_total_is_the_callers_lm_term_plus_the_scaled_lbc_and_lm_stays_the_models_own():
    # What a Trainer passes: its own (scaled) LM term, and the LBC's share of an optimizer step.
    model = adapted_llama(lbc_delta=0.2, lbc_weight=0.3).eval()
    batch = make_batch()
    plain = compute_loss(model, batch)

    def tripled(inputs):
        outputs = model(**inputs)
        return outputs.loss * 3, outputs

    scaled = compute_loss(model, batch, forward=tripled, lbc_scale=0.25)
    assert plain.lbc > 0
    assert torch.equal(scaled.lm, plain.lm) and torch.equal(scaled.lbc, plain.lbc)
    torch.testing.assert_close(scaled.total, 3 * plain.lm + 0.25 * plain.lbc, **TOL)


def test_top_k_lbc_reads_the_dense_probabilities_and_trains_every_router_row():
    # Sparse top-k computes 2 of 8 experts per token, but the balancing loss still sees all 8 probabilities,
    # so its gradient reaches every row of every router, chosen or not.
    from loramoe import adapted_modules

    model = adapted_llama(top_k=2, lbc_delta=0.2, lbc_weight=0.3)
    batch = make_batch()
    with RouterRecorder(model, detach=True) as rec:
        parts = compute_loss(model, batch)
    probs = rec.concat()
    assert all(p.shape == (4, 7, 8) for p in probs.values())
    torch.testing.assert_close(next(iter(probs.values())).sum(-1), torch.ones(4, 7), **TOL)
    expected = reference_lbc_over_layers(
        probs, "sum", task_types=batch["task_types"].tolist(), delta=0.2, beta=0.3, normalization="cv2"
    )
    torch.testing.assert_close(parts.lbc, torch.tensor(expected, dtype=torch.float32), **TOL)
    router_grads = torch.autograd.grad(parts.lbc, [m.loramoe_router for m in adapted_modules(model).values()])
    assert all((g.abs().sum(dim=1) > 0).all() for g in router_grads)


def test_zero_lbc_weight_gives_exactly_the_task_loss():
    model = adapted_llama(lbc_weight=0.0)
    batch = make_batch()
    parts = compute_loss(model, batch)
    plain = model(**{k: v for k, v in batch.items() if k != "task_types"})
    assert parts.lbc == 0
    assert torch.equal(parts.total, parts.lm)
    assert torch.equal(parts.lm, plain.loss)


def test_without_task_types_lbc_is_zero_and_lm_is_the_model_loss():
    model = adapted_llama()
    batch = make_batch(task_types=None)
    parts = compute_loss(model, batch)
    assert parts.lbc == 0
    assert torch.equal(parts.total, parts.lm)
    assert torch.equal(parts.lm, model(**batch).loss)
    assert parts.router_probs == {}


def test_record_without_task_types_returns_probs_and_zero_lbc():
    model = adapted_llama()
    parts = compute_loss(model, make_batch(task_types=None), record=True)
    assert parts.lbc == 0
    assert len(parts.router_probs) == 6


def test_inference_needs_no_task_types():
    model = adapted_llama()
    ids = make_batch()["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (4, 7, 320)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [[0, 2, 1, 0], [0, -1, 1, 0]])
def test_task_type_outside_binary_mode_is_a_data_error(bad):
    model = adapted_llama()
    batch = make_batch(task_types=bad)
    with pytest.raises(DataError, match="outside"):
        compute_loss(model, batch)
    with pytest.raises(DataError):
        check_task_types(torch.tensor(bad), 2)


def test_float_task_types_are_a_data_error():
    with pytest.raises(DataError, match="integer"):
        check_task_types(torch.tensor([0.0, 1.0]), 2)


def test_missing_labels_is_a_data_error():
    batch = make_batch()
    del batch["labels"]
    with pytest.raises(DataError, match="labels"):
        compute_loss(adapted_llama(), batch)


def test_adamw_steps_change_all_adapter_parameters_and_nothing_else():
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=4, rank=2, dropout=0.05)).train()
    batch = make_batch()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = adapter_parameters(model)
    adapter_before = {n: p.detach().clone() for n, p in adapter.items()}
    opt = torch.optim.AdamW(adapter.values(), lr=1e-2, weight_decay=0.0)

    def step() -> None:
        opt.zero_grad()
        compute_loss(model, batch).total.backward()
        opt.step()

    step()
    # Step 1: B = 0 gives A no gradient; B moves; the routers move only through the LBC.
    for name, p in adapter.items():
        changed = not torch.equal(p, adapter_before[name])
        assert changed == (not name.endswith("loramoe_A")), name
    for _ in range(3):
        step()
    for name, p in adapter.items():
        for expert in range(4):  # every expert of every adapted linear moved
            assert not torch.equal(p[expert], adapter_before[name][expert]), f"{name}[{expert}]"
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
            assert p.grad is None, name


def test_task_loss_alone_gives_router_and_A_no_gradient_at_init():
    model = inject(tiny_model("llama"), LoRAMoEConfig(dropout=0.0)).train()
    compute_loss(model, make_batch(task_types=None)).total.backward()
    for layer in adapted_modules(model).values():
        assert torch.count_nonzero(layer.loramoe_A.grad) == 0
        assert torch.count_nonzero(layer.loramoe_router.grad) == 0
        assert torch.count_nonzero(layer.loramoe_B.grad) > 0


def test_frozen_adapter_in_train_mode_computes_the_loss_without_a_checkpointing_error():
    model = adapted_llama().train()
    for p in adapter_parameters(model).values():
        p.requires_grad_(False)  # as load_adapter(..., is_trainable=False) leaves it
    parts = compute_loss(model, make_batch())
    assert parts.lbc > 0
