"""LoRAMoELinear against the per-expert loop reference (values and gradients) and its degenerate cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramoe.layer import LoRAMoELinear
from loramoe.routing import RouterRecorder

from reference import expert_loop_forward, expert_loop_topk_forward, plain_lora_forward

# float32 fused-vs-loop: only summation order differs.
TOL = {"rtol": 1e-5, "atol": 1e-5}
D_IN, D_OUT = 16, 24


def make_layer(*, num_experts=4, rank=3, alpha=8.0, conv1d=False, random_B=True, **kwargs) -> LoRAMoELinear:
    base = Conv1D(D_OUT, D_IN) if conv1d else nn.Linear(D_IN, D_OUT)
    if conv1d:
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    layer = LoRAMoELinear(base, num_experts=num_experts, rank=rank, alpha=alpha, **kwargs)
    for p in base.parameters():
        p.requires_grad_(False)
    if random_B:
        with torch.no_grad():
            layer.loramoe_B.normal_(std=0.5)
    return layer


def grads(out: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "gpt2_conv1d"])
def test_fused_forward_equals_expert_loop_values_and_grads(conv1d):
    layer = make_layer(conv1d=conv1d, dropout=0.3).eval()
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    weight = torch.randn(2, 5, D_OUT)
    params = [layer.loramoe_A, layer.loramoe_B, layer.loramoe_router, x]

    fused = layer(x)
    loop = expert_loop_forward(layer, x)
    torch.testing.assert_close(fused, loop, **TOL)
    for g_fused, g_loop, name in zip(grads(fused, params, weight), grads(loop, params, weight), "ABRx"):
        assert g_fused.abs().sum() > 0, name
        torch.testing.assert_close(g_fused, g_loop, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_forward_equals_topk_loop_values_and_grads(top_k):
    layer = make_layer(num_experts=4, top_k=top_k).eval()
    x = torch.randn(3, 4, D_IN, requires_grad=True)
    weight = torch.randn(3, 4, D_OUT)
    params = [layer.loramoe_A, layer.loramoe_B, layer.loramoe_router, x]

    fused = layer(x)
    loop = expert_loop_topk_forward(layer, x, top_k)
    torch.testing.assert_close(fused, loop, **TOL)
    for g_fused, g_loop, name in zip(grads(fused, params, weight), grads(loop, params, weight), "ABRx"):
        torch.testing.assert_close(g_fused, g_loop, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")


def test_topk_computes_only_the_chosen_experts():
    # An expert no token chooses never runs: NaN weights in it cannot reach the output (a dense product with a
    # zero weight would give NaN * 0 = NaN), and it gets no gradient.
    layer = make_layer(num_experts=4, top_k=2).eval()
    with torch.no_grad():
        layer.loramoe_router[3].fill_(0.0)
        layer.loramoe_router[:3].normal_()
    x = torch.randn(3, 4, D_IN).abs()
    with torch.no_grad():
        layer.loramoe_router[3] = -10.0  # logit -10 * sum(x): never in the top 2
        layer.loramoe_A[3].fill_(float("nan"))
        layer.loramoe_B[3].fill_(float("nan"))
    out = layer(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(layer.loramoe_A.grad[:3]).all()
    assert torch.equal(layer.loramoe_A.grad[3], torch.zeros_like(layer.loramoe_A.grad[3]))
    assert torch.equal(layer.loramoe_B.grad[3], torch.zeros_like(layer.loramoe_B.grad[3]))


def test_topk_expert_flops_scale_with_k_over_n():
    from torch.utils.flop_counter import FlopCounterMode

    def matmul_flops(layer, x):
        with FlopCounterMode(display=False) as counter:
            layer(x)
        return counter.get_total_flops()

    x = torch.randn(4, 16, D_IN)
    dense = make_layer(num_experts=8, rank=4).eval()
    top2 = make_layer(num_experts=8, rank=4, top_k=2).eval()
    base = matmul_flops(dense.base_layer, x)
    router = 2 * x.numel() // D_IN * D_IN * 8
    experts_dense = matmul_flops(dense, x) - base - router
    experts_top2 = matmul_flops(top2, x) - base - router
    tokens = x.numel() // D_IN
    assert experts_top2 == 2 * tokens * 2 * 4 * (D_IN + D_OUT)  # k experts per token, down and up
    assert experts_dense >= 4 * experts_top2  # N / k = 4 (dense also pads its fused GEMM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_topk_adds_into_a_base_output_of_another_dtype(dtype):
    layer = make_layer(num_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, D_IN)
    reference = expert_loop_topk_forward(layer, x, 2)
    layer.base_layer.to(dtype)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    tol = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else TOL
    torch.testing.assert_close(out.float(), reference, **tol)


def test_topk_routes_differently_from_dense():
    layer = make_layer(num_experts=4, top_k=2).eval()
    x = torch.randn(3, 4, D_IN)
    assert not torch.allclose(layer(x), expert_loop_forward(layer, x), atol=1e-4)


def test_topk_equal_to_num_experts_equals_dense():
    dense = make_layer(num_experts=4).eval()
    topk = make_layer(num_experts=4, top_k=4).eval()
    topk.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    params_d = [dense.loramoe_A, dense.loramoe_B, dense.loramoe_router, x]
    params_k = [topk.loramoe_A, topk.loramoe_B, topk.loramoe_router, x]
    weight = torch.randn(2, 5, D_OUT)
    out_d, out_k = dense(x), topk(x)
    torch.testing.assert_close(out_k, out_d, **TOL)
    for g_k, g_d in zip(grads(out_k, params_k, weight), grads(out_d, params_d, weight)):
        torch.testing.assert_close(g_k, g_d, **TOL)


def test_zero_init_B_gives_exactly_the_base_output():
    layer = make_layer(random_B=False, dropout=0.5)
    x = torch.randn(2, 5, D_IN)
    assert torch.equal(layer.loramoe_B, torch.zeros_like(layer.loramoe_B))
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.equal(layer(x), layer.base_layer(x))


def test_initialisation_matches_nn_linear_per_expert():
    layer = make_layer(num_experts=3, rank=5, random_B=False)
    bound = 1 / math.sqrt(D_IN)  # kaiming-uniform(a=sqrt(5)) on a (., D_IN) weight, as nn.Linear
    assert layer.loramoe_A.shape == (3, 5, D_IN)
    assert layer.loramoe_B.shape == (3, D_OUT, 5)
    assert layer.loramoe_router.shape == (3, D_IN)
    for p in (layer.loramoe_A, layer.loramoe_router):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.8 * bound  # uses the range, i.e. fan_in is D_IN not R * D_IN
    assert not torch.equal(layer.loramoe_A[0], layer.loramoe_A[1])


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "gpt2_conv1d"])
def test_one_expert_equals_plain_lora(conv1d):
    layer = make_layer(num_experts=1, rank=4, alpha=12.0, conv1d=conv1d).eval()
    x = torch.randn(2, 5, D_IN)
    expected = plain_lora_forward(layer.base_layer, layer.loramoe_A[0], layer.loramoe_B[0], 12.0, x)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_one_expert_equals_peft_lora_layer():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    layer = make_layer(num_experts=1, rank=4, alpha=12.0).eval()
    peft_base = nn.Linear(D_IN, D_OUT)
    peft_base.load_state_dict(layer.base_layer.state_dict())
    peft_layer = PeftLoraLinear(
        peft_base, "default", config=LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0), r=4, lora_alpha=12
    ).eval()
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.loramoe_A[0])
        peft_layer.lora_B["default"].weight.copy_(layer.loramoe_B[0])
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(layer(x), peft_layer(x), **TOL)


def test_uniform_router_equals_mean_of_experts():
    layer = make_layer(num_experts=4, rank=3, alpha=6.0).eval()
    with torch.no_grad():
        layer.loramoe_router.zero_()
    x = torch.randn(2, 5, D_IN)
    experts = [
        plain_lora_forward(layer.base_layer, layer.loramoe_A[i], layer.loramoe_B[i], 6.0, x) for i in range(4)
    ]
    torch.testing.assert_close(layer(x), torch.stack(experts).mean(0), **TOL)


def test_mixture_is_not_a_sum_of_experts():
    layer = make_layer(num_experts=4).eval()
    x = torch.randn(2, 5, D_IN)
    summed = layer.base_layer(x) + sum(
        layer.scaling * (x @ layer.loramoe_A[i].T) @ layer.loramoe_B[i].T for i in range(4)
    )
    assert not torch.allclose(layer(x), summed, atol=1e-3)


def test_router_rows_sum_to_one():
    layer = make_layer(num_experts=5, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.loramoe_router.normal_(std=3.0)
    x = torch.randn(3, 7, D_IN)
    probs = layer.router_probs(x)
    assert probs.shape == (3, 7, 5)
    assert probs.dtype == torch.float32
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 7), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("dropout_mode", "top_k"), [("per_expert", None), ("shared", None), ("per_expert", 2)]
)
def test_train_mode_dropout_is_stochastic_and_eval_mode_deterministic(dropout_mode, top_k):
    layer = make_layer(dropout=0.3, dropout_mode=dropout_mode, top_k=top_k)
    x = torch.randn(2, 5, D_IN)
    layer.train()
    first, second = layer(x), layer(x)
    assert first.shape == (2, 5, D_OUT)
    assert not torch.equal(first, second)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    reference = expert_loop_forward(layer, x) if top_k is None else expert_loop_topk_forward(layer, x, top_k)
    torch.testing.assert_close(layer(x), reference, **TOL)


@pytest.mark.parametrize(("dropout_mode", "same_mask"), [("per_expert", False), ("shared", True)])
def test_per_expert_dropout_draws_one_mask_per_expert_and_shared_one_mask(dropout_mode, same_mask):
    # Two experts that copy x into disjoint output halves, uniform router: the output shows each expert's mask.
    d = 64
    layer = LoRAMoELinear(
        nn.Linear(d, 2 * d, bias=False),
        num_experts=2,
        rank=d,
        alpha=float(d),
        dropout=0.5,
        dropout_mode=dropout_mode,
    )
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.loramoe_router.zero_()
        layer.loramoe_A.copy_(torch.eye(d).expand(2, d, d))
        layer.loramoe_B.zero_()
        layer.loramoe_B[0, :d] = torch.eye(d)
        layer.loramoe_B[1, d:] = torch.eye(d)
    x = torch.ones(1, d, requires_grad=True)
    out = layer.train()(x)[
        0
    ]  # each kept entry is G * (alpha / r) / (1 - p) = 0.5 * 1 * 2 = 1, dropped ones 0
    kept_0, kept_1 = out[:d] != 0, out[d:] != 0
    assert 0 < kept_0.sum() < d and 0 < kept_1.sum() < d
    torch.testing.assert_close(out[out != 0], torch.ones(int((out != 0).sum())))
    assert torch.equal(kept_0, kept_1) == same_mask

    # The backward pass uses the same masks: d out / d x and d out / d A_n are zero exactly where n dropped.
    grad_x, grad_A = torch.autograd.grad(out.sum(), [x, layer.loramoe_A])
    torch.testing.assert_close(grad_x[0], kept_0.float() + kept_1.float())
    torch.testing.assert_close(grad_A[0], kept_0.float().expand(d, d))
    torch.testing.assert_close(grad_A[1], kept_1.float().expand(d, d))


@pytest.mark.parametrize("top_k", [None, 2])
def test_router_sees_undropped_input(top_k):
    layer = make_layer(dropout=0.5, top_k=top_k)
    container = nn.Sequential(layer)
    x = torch.randn(2, 5, D_IN)
    with RouterRecorder(container, detach=True) as rec:
        container.eval()(x)
        container.train()(x)
    eval_probs, train_probs = rec.probs["0"]
    assert torch.equal(train_probs, eval_probs)
    torch.testing.assert_close(eval_probs, torch.softmax(x @ layer.loramoe_router.T, -1), **TOL)


def test_disabled_layer_returns_exactly_the_base_output():
    layer = make_layer().eval()
    x = torch.randn(2, 5, D_IN)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_bf16_base_keeps_float32_adapter_and_returns_base_dtype():
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = LoRAMoELinear(base, num_experts=2, rank=2, alpha=4.0)
    assert layer.loramoe_A.dtype == layer.loramoe_B.dtype == layer.loramoe_router.dtype == torch.float32
    assert layer(torch.randn(3, D_IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_layer_wraps_the_base_module_without_copying_it():
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRAMoELinear(base, num_experts=2, rank=2, alpha=4.0)
    assert layer.base_layer is base
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    conv = Conv1D(D_OUT, D_IN)
    assert LoRAMoELinear(conv, num_experts=2, rank=2, alpha=4.0).base_layer.weight is conv.weight


def test_layer_has_no_merge():
    assert not hasattr(LoRAMoELinear, "merge")


def test_non_linear_base_is_rejected():
    from loramoe.errors import TargetError

    with pytest.raises(TargetError, match="Embedding"):
        LoRAMoELinear(nn.Embedding(4, 4), num_experts=2, rank=2, alpha=4.0)


def test_cached_stacking_builds_once_and_is_dropped_on_exit():
    from loramoe.layer import cached_stacking

    layer = make_layer().eval()
    x = torch.randn(2, 5, D_IN)
    with torch.no_grad():
        plain = layer(x)
        with cached_stacking(layer):
            first = layer(x)
            cached = layer._stacked_cache
            assert cached is not None
            layer(x)
            assert layer._stacked_cache is cached  # built once
        assert layer._stacked_cache is None
        torch.testing.assert_close(first, plain, rtol=0, atol=0)
        layer.loramoe_B.mul_(2.0)  # a change outside the block is seen by the next forward
        torch.testing.assert_close(layer(x) - layer.base_layer(x), 2 * (plain - layer.base_layer(x)), **TOL)
    with cached_stacking(layer):  # with autograd on, nothing is cached (the stacked tensors carry a graph)
        layer(x).sum().backward()
        assert layer._stacked_cache is None
