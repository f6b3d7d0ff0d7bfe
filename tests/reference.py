"""Slow, obviously-correct reference implementations the library is compared against (STYLE.md, practice 11).

Everything here follows METHOD.md literally: Python loops over experts, tokens, samples; no fused tricks.
"""

from __future__ import annotations

import torch
from torch import nn


def router_probs_off(layer: nn.Module, x: torch.Tensor, off=()) -> torch.Tensor:
    """``softmax(W_g x)`` in float32 with the experts in ``off`` given probability 0 and the rest renormalised."""
    probs = torch.softmax((x.float() @ layer.loramoe_router.float().T), dim=-1)  # (..., N)
    if off:
        keep = torch.ones(layer.num_experts)
        keep[list(off)] = 0.0
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def expert_loop_forward(layer: nn.Module, x: torch.Tensor, off=()) -> torch.Tensor:
    """``y = base(x) + sum_i G_i(x) * (alpha / r) * B_i A_i x`` with ``G = softmax(W_g x)`` in float32 (no dropout).

    Uses the layer's own parameters, so gradients w.r.t. A, B, router and x can be compared with the fused forward.
    ``off``: experts switched off (probability 0, the others renormalised).
    """
    y = layer.base_layer(x)
    probs = router_probs_off(layer, x, off)  # (..., N)
    for i in range(layer.num_experts):
        A_i = layer.loramoe_A[i]  # (r, d_in)
        B_i = layer.loramoe_B[i]  # (d_out, r)
        y = y + probs[..., i : i + 1] * layer.scaling * ((x @ A_i.T) @ B_i.T)
    return y


def expert_loop_topk_forward(layer: nn.Module, x: torch.Tensor, k: int, off=()) -> torch.Tensor:
    """Per token: keep the k most probable experts, renormalise their probabilities to sum to 1, mix them.
    ``off``: experts switched off first (probability 0, the others renormalised)."""
    y = layer.base_layer(x)
    d_in = x.shape[-1]
    x_rows = x.reshape(-1, d_in)
    probs_rows = router_probs_off(layer, x_rows, off)
    out_rows = []
    for m in range(x_rows.shape[0]):
        p = probs_rows[m]
        chosen = sorted(range(layer.num_experts), key=lambda n: -float(p[n].detach()))[:k]
        total = sum(p[n] for n in chosen)
        row = torch.zeros(layer.out_features, dtype=x.dtype)
        for n in chosen:
            row = row + (p[n] / total) * layer.scaling * (
                layer.loramoe_B[n] @ (layer.loramoe_A[n] @ x_rows[m])
            )
        out_rows.append(row)
    return y + torch.stack(out_rows).reshape(y.shape)


def plain_lora_forward(
    base: nn.Module, A: torch.Tensor, B: torch.Tensor, alpha: float, x: torch.Tensor
) -> torch.Tensor:
    """Plain LoRA: ``y = base(x) + (alpha / r) * B A x`` with A (r, d_in), B (d_out, r)."""
    r = A.shape[0]
    return base(x) + (alpha / r) * ((x @ A.T) @ B.T)


def lbc_coefficient(task_type: int, expert: int, num_experts: int, delta: float, expert_groups=None) -> float:
    """The reference's coefficient rule.

    Binary (expert_groups None): a type-1 sample gets 1 + delta on the first half and 1 - delta on the second
    half; a type-0 sample the reverse. K types: 1 - delta on the sample's own contiguous group, 1 + delta elsewhere.
    """
    if expert_groups is None:
        first_half = expert < num_experts // 2
        if task_type == 1:
            return 1 + delta if first_half else 1 - delta
        if task_type == 0:
            return 1 - delta if first_half else 1 + delta
        raise ValueError(f"binary mode has no task type {task_type}")
    start = 0
    for group, size in enumerate(expert_groups):
        if start <= expert < start + size:
            return 1 - delta if group == task_type else 1 + delta
        start += size
    raise ValueError(f"expert {expert} is in no group of {expert_groups}")


def reference_lbc(
    probs: torch.Tensor,
    task_types: list[int],
    *,
    delta: float,
    beta: float,
    normalization: str = "cv2",
    mask: torch.Tensor | None = None,
    expert_groups=None,
) -> float:
    """METHOD.md steps 1-4 for one adapted linear, in Python floats (float64).

    1. Q[b, n] = sum over positions of G[b, t, n] (only unmasked positions, divided by their count, if a mask).
    2. C[b, n] by ``lbc_coefficient``.
    3. Z = C * Q flattened over the B x N entries.
    4. beta * Var(Z) / (Mean(Z)^2 + 1e-10) with the unbiased variance ("cv2"), or beta * Var(Z) / (Mean(Z) + 1e-10).
    """
    num_samples, num_positions, num_experts = probs.shape
    z = []
    for b in range(num_samples):
        for n in range(num_experts):
            if mask is None:
                q = sum(float(probs[b, t, n]) for t in range(num_positions))
            else:
                kept = [t for t in range(num_positions) if int(mask[b, t]) == 1]
                q = sum(float(probs[b, t, n]) for t in kept) / max(len(kept), 1)
            z.append(lbc_coefficient(int(task_types[b]), n, num_experts, delta, expert_groups) * q)
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / (len(z) - 1)
    if normalization == "cv2":
        return beta * var / (mean**2 + 1e-10)
    if normalization == "var_over_mean":
        return beta * var / (mean + 1e-10)
    raise ValueError(normalization)


def reference_lbc_over_layers(
    probs_by_layer: dict[str, torch.Tensor], reduction: str = "sum", **kwargs
) -> float:
    """Step 5: the LBC terms of every adapted linear, summed (reference) or averaged."""
    terms = [reference_lbc(p, **kwargs) for p in probs_by_layer.values()]
    return sum(terms) if reduction == "sum" else sum(terms) / len(terms)
