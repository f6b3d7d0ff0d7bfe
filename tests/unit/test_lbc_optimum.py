"""What the balancing constraints push the router toward: gradient descent on free router logits with a constraint
as the only loss reaches the optimum docs/method.md states (the LBC's group mass ratio (1 - delta) / (1 + delta),
balance inside each group; the group-mass term's separation), and the group-mass term's exact value."""

from __future__ import annotations

import pytest
import torch

from loramoe.config import LoRAMoEConfig
from loramoe.loss import group_mass_loss, localized_balancing_loss


def optimise_lbc_alone(types: torch.Tensor, cfg: LoRAMoEConfig, *, steps: int = 400) -> torch.Tensor:
    """Adam on free router logits (B, T, N) with the LBC as the only loss; returns the final probabilities."""
    logits = torch.nn.Parameter(torch.randn(len(types), 6, cfg.num_experts))
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = localized_balancing_loss(
            torch.softmax(logits, -1),
            types,
            group_of_expert=cfg.group_of_expert(),
            delta=cfg.lbc_delta,
            weight=1.0,
        )
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), -1)


@pytest.mark.parametrize("delta", [0.1, 0.5])
def test_lbc_descent_drives_group_mass_ratio_to_documented_target(delta):
    # Documented in loss.py: group 0 = experts [0, N/2) serves type 0 (downstream), group 1 = [N/2, N) type 1.
    n = 8
    types = torch.tensor([0, 1, 1, 0, 1])
    probs = optimise_lbc_alone(types, LoRAMoEConfig(num_experts=n, lbc_delta=delta))
    importance = probs.sum(1)  # (B, N)
    first, second = importance[:, : n // 2].sum(-1), importance[:, n // 2 :].sum(-1)
    own = torch.where(types == 0, first, second)
    other = torch.where(types == 0, second, first)
    target = (1 - delta) / (1 + delta)
    torch.testing.assert_close(other / own, torch.full((5,), target), rtol=0.02, atol=0)
    assert (own > other).all()  # each type leans toward its own group


def test_group_mass_descent_separates_the_groups_where_the_lbc_alone_splits_them():
    # The LBC alone settles at (1 - delta) / (1 + delta) = 0.82 (above); with the group-mass term ten times its
    # weight each sample moves nearly all its mass to its own group, and the LBC still balances the experts inside it.
    n, types = 8, torch.tensor([0, 1, 1, 0, 1])
    cfg = LoRAMoEConfig(num_experts=n, lbc_delta=0.1)
    logits = torch.nn.Parameter(torch.randn(len(types), 6, n))
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        probs = torch.softmax(logits, -1)
        groups = cfg.group_of_expert()
        loss = localized_balancing_loss(probs, types, group_of_expert=groups, delta=0.1, weight=0.1)
        loss = loss + group_mass_loss(probs, types, group_of_expert=groups, weight=1.0)
        loss.backward()
        opt.step()
    importance = torch.softmax(logits.detach(), -1).sum(1)
    first, second = importance[:, : n // 2], importance[:, n // 2 :]
    own = torch.where((types == 0)[:, None], first, second)
    assert (own.sum(-1) / importance.sum(-1) > 0.95).all()
    torch.testing.assert_close(own / own.mean(-1, keepdim=True), torch.ones_like(own), rtol=0.05, atol=0)


def test_group_mass_loss_is_minus_log_of_the_own_group_share():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.25, 0.25, 0.25, 0.25]]])  # (B=2, T=1, N=4)
    types = torch.tensor([1, 0])  # groups: experts 0-1 serve type 0, 2-3 type 1
    got = group_mass_loss(probs, types, group_of_expert=[0, 0, 1, 1], weight=2.0)
    want = 2.0 * -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.5))) / 2
    torch.testing.assert_close(got, want)
    assert group_mass_loss(probs, types, group_of_expert=[0, 0, 1, 1], weight=0.0) == 0


def k_group_masses(importance_BN: torch.Tensor, types: torch.Tensor, sizes: tuple[int, ...]):
    """Per sample: its own group's per-expert importance and every other expert's."""
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    for b, k in enumerate(types.tolist()):
        own_experts = set(range(starts[k], starts[k] + sizes[k]))
        own = torch.stack([importance_BN[b, e] for e in sorted(own_experts)])
        other = torch.stack([importance_BN[b, e] for e in range(sum(sizes)) if e not in own_experts])
        yield own, other


def test_lbc_descent_with_k_equal_groups_gives_per_expert_ratio():
    cfg = LoRAMoEConfig(num_experts=6, task_names=("a", "b", "c"), expert_groups=(2, 2, 2), lbc_delta=0.3)
    types = torch.tensor([0, 1, 2, 2, 0])
    importance = optimise_lbc_alone(types, cfg).sum(1)  # (B, N)
    target = (1 - 0.3) / (1 + 0.3)
    for own, other in k_group_masses(importance, types, (2, 2, 2)):
        torch.testing.assert_close(other / own.mean(), torch.full_like(other, target), rtol=0.02, atol=0)
        torch.testing.assert_close(own / own.mean(), torch.ones_like(own), rtol=0.02, atol=0)


def test_lbc_descent_with_unequal_groups_leans_each_type_toward_its_group():
    # With unequal group sizes Z = C * Q cannot be constant across samples (each sample's Q sums to T), so the
    # optimum is a compromise and the ratio is not exactly (1 - delta) / (1 + delta); the direction still holds.
    cfg = LoRAMoEConfig(num_experts=6, task_names=("a", "b", "c"), expert_groups=(2, 3, 1), lbc_delta=0.3)
    types = torch.tensor([0, 1, 2, 2, 0])
    importance = optimise_lbc_alone(types, cfg).sum(1)  # (B, N)
    for own, other in k_group_masses(importance, types, (2, 3, 1)):
        assert own.min() > other.max()


def test_lbc_descent_with_zero_delta_gives_uniform_importance():
    types = torch.tensor([0, 1, 1])
    importance = optimise_lbc_alone(types, LoRAMoEConfig(lbc_delta=0.0)).sum(1)  # (B, N), rows sum to T = 6
    torch.testing.assert_close(importance, torch.full_like(importance, 6 / 8), rtol=0.02, atol=0)
