"""Recording router probabilities, and summary statistics of them.

Design decisions:
- The recorder is a context manager: on entry it registers one router hook per adapted layer, on exit it removes
  them all, so nothing stays on the model.
- Calls made while autograd runs a backward pass are ignored: gradient checkpointing recomputes the forward
  inside backward, and those recomputations must not add records.
- With ``use_cache`` generation every decoding step is its own forward; ``concat()`` joins the steps along T.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.module_tracker import ModuleTracker

from loramoe.inject import adapted_modules
from loramoe.layer import LoRAMoELinear

# Only its public ``is_bw`` property is read; the tracker is never entered, so it installs no hooks.
_BACKWARD_PROBE = ModuleTracker()


class RouterRecorder:
    """Collect each adapted layer's router probabilities for the forwards run inside the block.

    Args:
        model: a model with LoRAMoE layers.
        detach: store detached tensors (for analysis); keep the graph (False) when a loss is computed from them.
        to_cpu: move each record to the CPU (for long analysis runs on an accelerator).

    Attributes:
        probs: layer name -> list of float32 tensors ``(B, T, N)``, one per forward.

    Example:
        >>> with RouterRecorder(model) as rec:
        ...     model(**batch)
        >>> rec.probs["model.layers.0.mlp.gate_proj"][0].shape  # (B, T, N)
    """

    def __init__(self, model: nn.Module, *, detach: bool = False, to_cpu: bool = False) -> None:
        self.model, self.detach, self.to_cpu = model, detach, to_cpu
        self.probs: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> RouterRecorder:
        layers = adapted_modules(self.model)
        if not layers:
            raise ValueError("RouterRecorder: the model has no LoRAMoE layers")
        self.probs = {name: [] for name in layers}
        for name, layer in layers.items():
            self._handles.append(layer.register_router_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, name: str):
        records = self.probs[name]

        def hook(layer: LoRAMoELinear, probs: torch.Tensor) -> None:
            if _BACKWARD_PROBE.is_bw:  # a gradient-checkpointing recomputation, not a new forward
                return
            if self.detach:
                probs = probs.detach()
            if self.to_cpu:
                probs = probs.cpu()
            records.append(probs)

        return hook

    def concat(self) -> dict[str, torch.Tensor]:
        """Layer name -> the records joined along the token axis ``(B, T_total, N)`` (generation steps in order)."""
        return {name: torch.cat(records, dim=-2) for name, records in self.probs.items() if records}


def group_mass(
    probs_BTN: torch.Tensor, group_of_expert: list[int], mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean router mass each sample puts on each expert group, over its (unmasked) positions.

    Returns:
        ``(B, K)`` float32, rows sum to 1.
    """
    groups = torch.as_tensor(group_of_expert, device=probs_BTN.device)
    onehot_NK = torch.nn.functional.one_hot(groups).to(torch.float32)  # (N, K)
    per_token_BTK = probs_BTN.float() @ onehot_NK
    if mask_BT is None:
        return per_token_BTK.mean(dim=1)
    m = mask_BT.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (per_token_BTK * m).sum(1) / m.sum(1).clamp_min(1.0)


def routing_stats(
    probs: dict[str, torch.Tensor],
    task_types_B: torch.Tensor,
    *,
    group_of_expert: list[int],
    task_names: tuple[str, ...],
    mask_BT: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per task type: mean mass on each expert group and mean router entropy, averaged over layers.

    Keys look like ``router/knowledge/mass_knowledge`` and ``router/downstream/entropy``, ready for
    ``Trainer.log``. Types absent from the batch are left out.
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        layer_mass = torch.stack(
            [group_mass(p, group_of_expert, mask_BT) for p in probs.values()]
        )  # (L, B, K)
        entropy_LBT = torch.stack(
            [-(p.float() * p.float().clamp_min(1e-12).log()).sum(-1) for p in probs.values()]
        )
        if mask_BT is None:
            entropy_B = entropy_LBT.mean(dim=(0, 2))
        else:
            m = mask_BT.to(torch.float32)
            entropy_B = (entropy_LBT * m).sum(-1).mean(0) / m.sum(-1).clamp_min(1.0)
        mass_BK = layer_mass.mean(0)
        for k, type_name in enumerate(task_names):
            rows = task_types_B == k
            if not bool(rows.any()):
                continue
            for g, group_name in enumerate(task_names):
                out[f"router/{type_name}/mass_{group_name}"] = float(mass_BK[rows, g].mean())
            out[f"router/{type_name}/entropy"] = float(entropy_B[rows].mean())
    return out
