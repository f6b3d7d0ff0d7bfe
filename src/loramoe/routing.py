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

from loramoe.errors import AdapterError, DataError
from loramoe.inject import adapted_modules, check_model
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
        check_model(model, "RouterRecorder")
        self.model, self.detach, self.to_cpu = model, detach, to_cpu
        self.probs: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> RouterRecorder:
        layers = adapted_modules(self.model)
        if not layers:
            raise AdapterError(
                "RouterRecorder: the model has no LoRAMoE layers; inject or load an adapter first (loramoe.inject, "
                "loramoe.load_adapter)"
            )
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
    # Built on the CPU from the list, so that no group count is read back from the device.
    groups = torch.as_tensor(list(group_of_expert))
    onehot_NK = torch.nn.functional.one_hot(groups, int(groups.max()) + 1).to(probs_BTN.device, torch.float32)
    return per_sample_mean(probs_BTN.float() @ onehot_NK, mask_BT)


def routing_sums(
    probs: dict[str, torch.Tensor],
    task_types_B: torch.Tensor,
    *,
    group_of_expert: list[int],
    num_types: int,
    mask_BT: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per task type, sums over the batch's samples of the router mass on each expert group and of the router
    entropy (each sample's mean over its positions and the layers), and the number of samples.

    Sums, not means, so that batches add up; everything stays on the probabilities' device (no host read), so a
    training step can call this every step and a logger divide once per log.

    Returns:
        ``mass`` ``(K, G)``, ``entropy`` ``(K,)``, ``count`` ``(K,)``, all float32; K task types, G expert groups.
    """
    if not probs:
        raise AdapterError(
            "routing_sums: no router probabilities; record them on a model with LoRAMoE layers"
        )
    batch = next(iter(probs.values())).shape[0]
    if not isinstance(task_types_B, torch.Tensor) or tuple(task_types_B.shape) != (batch,):
        got = (
            tuple(task_types_B.shape)
            if isinstance(task_types_B, torch.Tensor)
            else type(task_types_B).__name__
        )
        raise DataError(f"task_types must have shape ({batch},), one per sample; got {got}")
    with torch.no_grad():
        first = next(iter(probs.values()))
        mass_BG = torch.stack([group_mass(p, group_of_expert, mask_BT) for p in probs.values()]).mean(0)
        entropy_BT = torch.stack(
            [-(p.float() * p.float().clamp_min(1e-12).log()).sum(-1) for p in probs.values()]
        ).mean(0)
        entropy_B = per_sample_mean(entropy_BT, mask_BT)
        types = torch.arange(num_types, device=first.device)
        onehot_BK = (task_types_B.to(first.device).unsqueeze(1) == types).to(torch.float32)
        return {"mass": onehot_BK.T @ mass_BG, "entropy": onehot_BK.T @ entropy_B, "count": onehot_BK.sum(0)}


def per_sample_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean over its positions: ``(B, T, ...)`` -> ``(B, ...)``; masked positions (0) left out.

    The LBC, the routing statistics and the routing analysis all weigh samples this way, so a long sample does
    not outvote short ones.
    """
    values_BT = values_BT.float()
    if mask_BT is None:
        return values_BT.mean(dim=1)
    m = mask_BT.to(torch.float32)
    m = m.reshape(*m.shape, *([1] * (values_BT.dim() - 2)))
    return (values_BT * m).sum(1) / m.sum(1).clamp_min(1.0)
