"""The private kernels of the layer (loramoe._kernels) against plain dense masks and per-expert loops.

Every kernel runs in both of its forms: the CPU one (CSR product, grouped top-k) and the sync-free one used on
accelerators and under torch.compile (``use_cpu_kernels`` patched to False).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramoe import _kernels
from loramoe.layer import LoRAMoELinear

from reference import expert_loop_topk_forward

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, only the summation order differs
CPU = torch.device("cpu")
# The layer-level test also runs on a GPU when one is present (scripts/gpu_check.sh runs this file there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "sync_free"])
def cpu_kernels(request, monkeypatch) -> bool:
    monkeypatch.setattr(_kernels, "use_cpu_kernels", lambda x: request.param)
    return request.param


def keep_mask(numel: int, pos: torch.Tensor) -> torch.Tensor:
    """The dense 0/1 keep mask of the dropped positions (sentinels at ``numel`` ignored)."""
    keep = torch.ones(numel + 1)
    keep[pos.long()] = 0
    return keep[:numel]


def test_dropped_positions_follow_the_bernoulli_law():
    torch.manual_seed(0)
    n, p = 400_000, 0.05
    pos = _kernels.dropped_positions(n, p, CPU, torch.int64)
    real = pos[pos < n]
    assert (real[1:] > real[:-1]).all() and real[0] >= 0
    assert (pos[real.numel() :] == n).all() and pos.numel() > real.numel()  # the tail is sentinels only
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(real.numel() / n - p) < 5 * sd
    gaps = (real[1:] - real[:-1]).float()  # i.i.d. Geometric(p): P(gap = k) = (1 - p)^(k - 1) p
    for k in (1, 2, 10):
        expected = (1 - p) ** (k - 1) * p
        assert abs((gaps == k).float().mean().item() - expected) < 5 * (expected / gaps.numel()) ** 0.5
    counts = torch.zeros(7)
    for _ in range(3000):  # tiny sizes: each entry dropped with probability p, independently of the length
        counts += 1 - keep_mask(7, _kernels.dropped_positions(7, 0.3, CPU, torch.int64))
    torch.testing.assert_close(counts / 3000, torch.full((7,), 0.3), atol=0.04, rtol=0)


def test_dropped_positions_have_a_length_fixed_by_the_shape():
    lengths = {_kernels.dropped_positions(5000, 0.1, CPU, torch.int32).numel() for _ in range(20)}
    assert len(lengths) == 1


def test_stacked_layouts_equal_the_per_expert_matrices():
    n, r, d, o = 3, 2, 5, 7
    A, B, router = torch.randn(n, r, d), torch.randn(n, o, r), torch.randn(n, d)
    down = _kernels.stack_down(A, router)
    assert down.shape == (16, d)  # n * r + n = 9 rows padded to 16
    for e in range(n):
        torch.testing.assert_close(down[e * r : (e + 1) * r], A[e], rtol=0, atol=0)
        torch.testing.assert_close(_kernels.stack_up(B)[e * r : (e + 1) * r], B[e].t(), rtol=0, atol=0)
    torch.testing.assert_close(down[n * r : n * r + n], router, rtol=0, atol=0)
    assert not down[n * r + n :].any()


@pytest.mark.parametrize("m, p", [(11, 0.4), (3, 0.9), (64, 0.05)])
def test_per_expert_dropped_equals_dense_masks_values_and_grads(cpu_kernels, m, p):
    n, r, d = 3, 2, 7
    x = torch.randn(m, d, requires_grad=True)
    A = torch.randn(n, r, d, requires_grad=True)
    torch.manual_seed(1)
    got = _kernels.per_expert_dropped(x, A, p)  # (M, N*R)
    torch.manual_seed(1)
    pos = _kernels.dropped_positions(m * n * d, p, CPU, torch.int64)
    dropped_NMD = (1 - keep_mask(m * n * d, pos)).view(m, n, d).transpose(0, 1)
    want = torch.cat([(x * dropped_NMD[e]) @ A[e].t() for e in range(n)], dim=1)
    torch.testing.assert_close(got, want, **TOL)
    weight = torch.randn(m, n * r)
    for g, w in zip(
        torch.autograd.grad((got * weight).sum(), [x, A]), torch.autograd.grad((want * weight).sum(), [x, A])
    ):
        torch.testing.assert_close(g, w, **TOL)


def test_shared_dropout_equals_a_dense_mask():
    x = torch.randn(9, 5, requires_grad=True)
    torch.manual_seed(2)
    got = _kernels.shared_dropout(x, 0.3)
    torch.manual_seed(2)
    keep = keep_mask(45, _kernels.dropped_positions(45, 0.3, CPU, torch.int64)).view(9, 5)
    torch.testing.assert_close(got, x * keep, rtol=0, atol=0)
    grad = torch.randn(9, 5)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], grad * keep, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_mode", ["per_expert", "shared"])
def test_layer_sparse_dropout_equals_explicit_masks_values_and_grads(
    cpu_kernels, dropout_mode, device, monkeypatch
):
    drawn, draw = [], _kernels.dropped_positions

    def recording_draw(numel, *args):
        drawn.append((numel, draw(numel, *args)))
        return drawn[-1][1]

    monkeypatch.setattr(_kernels, "dropped_positions", recording_draw)
    n, r, d, o, m, p = 3, 2, 7, 5, 11, 0.4
    base = nn.Linear(d, o).to(device)
    layer = LoRAMoELinear(base, num_experts=n, rank=r, alpha=4.0, dropout=p, dropout_mode=dropout_mode)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.loramoe_B.normal_()
    x = torch.randn(m, d, device=device, requires_grad=True)
    out = layer.train()(x)
    numel, pos = drawn[0]
    keep = keep_mask(numel, pos.cpu()).to(device)
    masks = (
        keep.view(m, n, d).transpose(0, 1)
        if dropout_mode == "per_expert"
        else keep.view(m, d).expand(n, m, d)
    )
    probs = torch.softmax(x @ layer.loramoe_router.T, -1)
    expected = layer.base_layer(x)
    for i in range(n):
        expert = (x * masks[i] / (1 - p)) @ layer.loramoe_A[i].T @ layer.loramoe_B[i].T
        expected = expected + probs[:, i : i + 1] * layer.scaling * expert
    torch.testing.assert_close(out, expected, **TOL)
    weight = torch.randn(m, o, device=device)
    params = [x, layer.loramoe_A, layer.loramoe_B, layer.loramoe_router]
    got = torch.autograd.grad((out * weight).sum(), params)
    want = torch.autograd.grad((expected * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_both_top_k_forms_equal_the_loop_values_and_grads(cpu_kernels, top_k):
    layer = LoRAMoELinear(nn.Linear(16, 24), num_experts=4, rank=3, alpha=8.0, top_k=top_k).eval()
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.loramoe_B.normal_(std=0.5)
    x = torch.randn(3, 4, 16, requires_grad=True)
    params = [layer.loramoe_A, layer.loramoe_B, layer.loramoe_router, x]
    out, want = layer(x), expert_loop_topk_forward(layer, x, top_k)
    torch.testing.assert_close(out, want, **TOL)
    weight = torch.randn(3, 4, 24)
    for g, w in zip(
        torch.autograd.grad((out * weight).sum(), params), torch.autograd.grad((want * weight).sum(), params)
    ):
        torch.testing.assert_close(g, w, **TOL)


def test_grouped_top_k_with_per_expert_dropout_masks_each_pair():
    # Every token picks both experts; expert e writes only output column e, so the columns show each pair's mask.
    x = torch.ones(64, 8)
    A = torch.ones(2, 1, 8)
    B = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # (N, O, R)
    out = _kernels.grouped_top_k(
        torch.zeros(64, 2),
        x,
        torch.ones(64, 2),
        torch.tensor([[0, 1]] * 64),
        A,
        B,
        dropout=0.5,
        dropout_mode="per_expert",
    )
    assert out.shape == (64, 2)
    assert (out[:, 0] != out[:, 1]).any()  # one mask per (token, expert) pair, not per token
    # F.dropout rescales: each column is 2 * Binomial(8, 0.5), mean 8.
    torch.testing.assert_close(out.mean(0), torch.full((2,), 8.0), atol=2.0, rtol=0)
