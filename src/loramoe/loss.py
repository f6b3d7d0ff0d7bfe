"""The localized balancing constraint (LBC, LoRAMoE Sec. 3.2) and the training loss.

Dimension legend: B samples, T positions, N experts, K task types.

Design decisions:
- ``localized_balancing_loss`` is a pure function of router probabilities and task types; it matches the
  reference code by default: importance summed over ALL positions, coefficient ``1 - delta`` on the expert group
  of the sample's own type and ``1 + delta`` elsewhere, squared coefficient of variation with the unbiased
  variance over the flattened (B x N) entries plus 1e-10, in float32.
- Which way the samples go: the loss is zero when importance is proportional to 1 / coefficient, so a sample of
  type k is pushed TOWARD group k (its ``1 - delta`` experts) by the ratio (1 - delta) / (1 + delta). In binary mode,
  group 0 = experts [0, N/2) serves ``downstream`` (type 0) and group 1 = experts [N/2, N) serves ``knowledge``
  (type 1): the reference's assignment (its type-1 coefficients are 1 + delta on the first half).
  The ratio is exact when the groups have equal sizes; with unequal ``expert_groups`` the loss cannot reach zero
  and its minimum is a compromise that still leans each type toward its own group.
- ``compute_loss`` is the only place that walks the model: it opens a recorder, runs the model's own causal-LM
  loss, and sums the per-layer LBC terms.
- One total: ``LossParts.total`` is the value a caller backpropagates. A training engine that scales the LM loss
  (the Trainer's token average over processes) or accumulates gradients passes its own LM term (``forward``) and
  the LBC's share of an optimizer step (``lbc_scale``), so the sum is made here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from loramoe.config import NORMALIZATIONS
from loramoe.errors import ConfigError, DataError, TrainingError
from loramoe.inject import adapted_modules, check_model, get_config
from loramoe.routing import RouterRecorder, per_sample_mean
from loramoe.validation import check_value, is_int, number, shown

EPS = 1e-10  # the reference's epsilon in Var / (Mean^2 + eps)


def lbc_coefficients(
    task_types_B: torch.Tensor, group_of_expert: list[int] | torch.Tensor, delta: float
) -> torch.Tensor:
    """``C[b, n] = 1 - delta`` if expert n belongs to sample b's group, else ``1 + delta``. Shape (B, N), float32."""
    groups_N = torch.as_tensor(group_of_expert, device=task_types_B.device)
    own_BN = task_types_B.unsqueeze(-1) == groups_N.unsqueeze(0)
    return torch.where(own_BN, 1.0 - delta, 1.0 + delta).to(torch.float32)


def check_task_types(task_types_B: torch.Tensor, num_types: int, batch_size: int | None = None) -> None:
    """Raise ``DataError`` unless ``task_types_B`` is an integer tensor of shape ``(batch_size,)`` with every type
    in ``[0, num_types)``. (A (B, 1) tensor would broadcast in the LBC into a wrong loss without an error.)

    The shape and dtype are checked on any device (no sync). The values are read only from a CPU tensor. On an
    accelerator reading them would stall every training step (a host-device sync); there the data pipeline has
    already checked each record's type against the task names where it was read (``data/sources.py``).
    """
    if not isinstance(task_types_B, torch.Tensor):
        raise DataError(
            f"task_types must be a torch tensor of shape (B,), one integer type per sample; got "
            f"{type(task_types_B).__name__}"
        )
    if task_types_B.dim() != 1 or (batch_size is not None and task_types_B.shape[0] != batch_size):
        want = f"({batch_size},)" if batch_size is not None else "(B,)"
        raise DataError(
            f"task_types must have shape {want}, one type per sample of the batch; got {tuple(task_types_B.shape)}"
        )
    if task_types_B.dtype.is_floating_point or task_types_B.dtype == torch.bool:
        raise DataError(f"task_types must be an integer tensor, got {task_types_B.dtype}")
    if task_types_B.device.type != "cpu" or not task_types_B.numel():
        return
    if int(task_types_B.min()) < 0 or int(task_types_B.max()) >= num_types:
        bad = sorted({int(t) for t in task_types_B.flatten().tolist() if not 0 <= int(t) < num_types})
        raise DataError(
            f"task_types {bad} outside the configured types 0..{num_types - 1}; label each sample with one of "
            f"the configured task_names (binary mode: 0 = downstream, 1 = knowledge)"
        )


def localized_balancing_loss(
    probs_BTN: torch.Tensor,
    task_types_B: torch.Tensor,
    *,
    group_of_expert: list[int] | torch.Tensor,
    delta: float,
    weight: float,
    normalization: str = "cv2",
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LBC of one adapted linear.

    Args:
        probs_BTN: router probabilities ``(B, T, N)``.
        task_types_B: integer task type per sample ``(B,)``; must index ``group_of_expert``'s groups.
        group_of_expert: the task type each expert serves, length N (a list, or a tensor on the probs' device).
        delta: localisation strength in [0, 1).
        weight: beta.
        normalization: ``"cv2"`` (Var / Mean^2, reference) or ``"var_over_mean"`` (Var / Mean, paper text).
        mask_BT: if given, only these positions count and each sample's importance is divided by its length
            (METHOD.md parity option); None counts every position (reference).

    Returns:
        A float32 scalar.
    """
    if not isinstance(probs_BTN, torch.Tensor) or probs_BTN.dim() != 3:
        got = tuple(probs_BTN.shape) if isinstance(probs_BTN, torch.Tensor) else type(probs_BTN).__name__
        raise DataError(f"router probabilities must be a (B, T, N) tensor, got {got}")
    _check_lbc_args(probs_BTN, group_of_expert, delta, weight, normalization, mask_BT)
    if not isinstance(task_types_B, torch.Tensor) or tuple(task_types_B.shape) != tuple(probs_BTN.shape[:1]):
        got = (
            tuple(task_types_B.shape)
            if isinstance(task_types_B, torch.Tensor)
            else type(task_types_B).__name__
        )
        raise DataError(f"task_types must have shape ({probs_BTN.shape[0]},), one per sample; got {got}")
    if mask_BT is None:
        importance_BN = probs_BTN.float().sum(dim=1)
    else:
        importance_BN = per_sample_mean(probs_BTN, mask_BT)
    z = (lbc_coefficients(task_types_B, group_of_expert, delta) * importance_BN).flatten()  # (B*N,)
    mean = z.mean()
    if normalization == "cv2":
        return weight * z.var(unbiased=True) / (mean * mean + EPS)
    return weight * z.var(unbiased=True) / (mean + EPS)


def group_mass_loss(
    probs_BTN: torch.Tensor,
    task_types_B: torch.Tensor,
    *,
    group_of_expert: list[int] | torch.Tensor,
    weight: float,
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Beyond the paper: ``weight`` times the mean over samples of ``-log`` (the share of the sample's importance
    on the experts of its own group), for one adapted linear.

    Zero only when every sample routes all its mass to its own group; unlike the LBC (whose optimum leaves a share
    ``(1 - delta) / (1 + delta)`` of the own group's mass on the other groups) it separates the groups. Importance
    is counted as the LBC counts it (``mask_BT``: real tokens, per-sample mean).

    Returns:
        A float32 scalar.
    """
    _check_lbc_args(probs_BTN, group_of_expert, 0.0, weight, "cv2", mask_BT)
    importance_BN = probs_BTN.float().sum(dim=1) if mask_BT is None else per_sample_mean(probs_BTN, mask_BT)
    groups_N = torch.as_tensor(group_of_expert, device=probs_BTN.device)
    own_BN = groups_N[None, :] == task_types_B.to(probs_BTN.device)[:, None]
    share_B = (importance_BN * own_BN).sum(dim=-1) / importance_BN.sum(dim=-1).clamp_min(EPS)
    return weight * -share_B.clamp_min(EPS).log().mean()


def _check_lbc_args(
    probs_BTN: torch.Tensor,
    group_of_expert: list[int] | torch.Tensor,
    delta: float,
    weight: float,
    normalization: str,
    mask_BT: torch.Tensor | None,
) -> None:
    """Types and shapes only (no value read from the device): a wrong one raises a ``loramoe.errors`` type."""
    n = probs_BTN.shape[-1]
    if isinstance(group_of_expert, torch.Tensor):
        ok = tuple(group_of_expert.shape) == (n,) and not group_of_expert.is_floating_point()
    else:
        ok = isinstance(group_of_expert, (list, tuple)) and len(group_of_expert) == n
        ok = ok and all(is_int(g) for g in group_of_expert)
    if not ok:
        raise ConfigError(f"group_of_expert must give each of the {n} experts its task type (ints), got "
                          f"{shown(group_of_expert)}")  # fmt: skip
    check_value("delta", delta, number(0, 1, high_open=True))
    check_value("weight", weight, number(0))
    if normalization not in NORMALIZATIONS:  # anything else would silently compute var / mean
        raise ConfigError(f"normalization must be one of {list(NORMALIZATIONS)}, got {shown(normalization)}")
    if mask_BT is not None and (
        not isinstance(mask_BT, torch.Tensor) or tuple(mask_BT.shape) != tuple(probs_BTN.shape[:2])
    ):
        got = tuple(mask_BT.shape) if isinstance(mask_BT, torch.Tensor) else type(mask_BT).__name__
        raise DataError(f"mask_BT must be None or a (B, T) = {tuple(probs_BTN.shape[:2])} tensor, got {got}")


@dataclass
class LossParts:
    """The training loss and its parts; all scalars are tensors on the model's device.

    Attributes:
        total: the value to backpropagate: the LM term plus ``lbc_scale * lbc`` (``compute_loss``); with the
            defaults ``lm + lbc``.
        lm: exactly the model's own causal-LM loss (before any scaling by a training engine), for reporting.
        lbc: the localized balancing constraint (plus the group-mass term when ``group_mass_weight`` > 0) summed
            (or averaged) over adapted linears; 0 when there are no
            task types or ``lbc_weight`` is 0. Unscaled.
        router_probs: layer name -> ``(B, T, N)`` probabilities of this forward (empty when not recorded).
        outputs: the model's own output object (logits etc.).
    """

    total: torch.Tensor
    lm: torch.Tensor
    lbc: torch.Tensor
    router_probs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: object = None


def compute_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    record: bool = False,
    forward: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, object]] | None = None,
    lbc_scale: float = 1.0,
    **model_kwargs,
) -> LossParts:
    """Causal-LM loss plus the localized balancing constraint.

    Args:
        model: an adapted model (``loramoe.inject``).
        batch: ``input_ids``, ``attention_mask``, ``labels`` and optionally ``task_types`` (B,).
        record: also record router probabilities when the LBC is off (for statistics).
        forward: runs the model on the batch (``task_types`` removed) and returns ``(LM term, outputs)``, the LM
            loss as the caller trains on it (the Trainer passes its own ``compute_loss``). Default: the model's
            forward with ``model_kwargs`` and its ``loss``.
        lbc_scale: the LBC's factor in ``total`` (a Trainer that accumulates gradients over k micro-batches of a
            token-averaged LM loss gives 1/k, so the constraint counts once per optimizer step).
        **model_kwargs: passed to the model's forward (e.g. ``num_items_in_batch``) when ``forward`` is not given.

    Returns:
        LossParts.
    """
    check_model(model, "compute_loss()")
    if not isinstance(batch, Mapping):
        raise DataError(
            f"compute_loss needs the batch as a mapping of tensors (input_ids, labels, ...), got {type(batch).__name__}"
        )
    cfg = get_config(model)
    inputs = dict(batch)
    task_types = inputs.pop("task_types", None)
    if "labels" not in inputs:
        raise DataError(
            "compute_loss needs 'labels' in the batch (use -100 on positions that are not learned)"
        )
    _check_batch(inputs)
    check_value("lbc_scale", lbc_scale, number(0))
    input_ids = inputs.get("input_ids")
    batch_size = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else None
    if batch_size == 0 or (isinstance(input_ids, torch.Tensor) and input_ids.numel() == 0):
        raise DataError("the batch is empty (no samples or no tokens); give at least one sample")
    use_lbc = task_types is not None and (cfg.lbc_weight > 0 or cfg.group_mass_weight > 0)
    if task_types is not None:
        check_task_types(task_types, len(cfg.task_names), batch_size)
    if forward is None:

        def forward(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
            outputs = model(**inputs, **model_kwargs)
            return outputs.loss, outputs

    if not (use_lbc or record):
        lm_term, outputs = forward(inputs)
        lm = _own_loss(outputs, lm_term)
        return LossParts(total=lm_term, lm=lm, lbc=lm.new_zeros(()), outputs=outputs)
    with RouterRecorder(model) as recorder:
        lm_term, outputs = forward(inputs)
    probs = recorder.concat()
    lm = _own_loss(outputs, lm_term)
    if use_lbc:
        mask = inputs.get("attention_mask") if cfg.lbc_positions == "non_padding" else None
        lbc = _lbc(model, probs, task_types, mask)
    else:
        lbc = lm.new_zeros((), dtype=torch.float32)
    total = lm_term + (lbc * lbc_scale).to(lm_term.dtype)
    return LossParts(total=total, lm=lm, lbc=lbc, router_probs=probs, outputs=outputs)


def _check_batch(inputs: dict) -> None:
    """The model's own tensors are tensors, and labels are shaped like the input ids."""
    for key in ("input_ids", "attention_mask", "labels"):
        if key in inputs and not isinstance(inputs[key], torch.Tensor):
            raise DataError(f"batch[{key!r}] must be a tensor, got {type(inputs[key]).__name__}")
    ids, labels = inputs.get("input_ids"), inputs["labels"]
    if ids is not None and labels.shape != ids.shape:
        raise DataError(f"batch['labels'] has shape {tuple(labels.shape)}, input_ids {tuple(ids.shape)}; they "
                        "must match (use -100 on positions that are not learned)")  # fmt: skip


def _own_loss(outputs: object, lm_term: torch.Tensor) -> torch.Tensor:
    """The model's own loss in ``outputs`` (a ``ModelOutput`` or dict), else the LM term itself."""
    own = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    return own if isinstance(own, torch.Tensor) else lm_term


def _lbc(
    model: nn.Module, probs: dict[str, torch.Tensor], task_types_B: torch.Tensor, mask_BT: torch.Tensor | None
) -> torch.Tensor:
    """The LBC of one forward: each adapted linear's term, summed (or averaged) as the config says."""
    cfg = get_config(model)
    routers_trainable = any(layer.loramoe_router.requires_grad for layer in adapted_modules(model).values())
    if (
        torch.is_grad_enabled()
        and model.training
        and routers_trainable  # a frozen adapter (load_adapter default) legitimately gives no gradient
        and not any(p.requires_grad for p in probs.values())
    ):
        raise TrainingError(
            "router probabilities carry no gradient, so the LBC cannot train the routers; this happens with "
            "reentrant gradient checkpointing: use gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    # One copy on the device for all linears, not one per linear.
    groups = torch.as_tensor(cfg.group_of_expert(), device=task_types_B.device)
    terms = torch.stack(
        [
            localized_balancing_loss(
                p,
                task_types_B,
                group_of_expert=groups,
                delta=cfg.lbc_delta,
                weight=cfg.lbc_weight,
                normalization=cfg.lbc_normalization,
                mask_BT=mask_BT,
            )
            for p in probs.values()
        ]
    )
    if cfg.group_mass_weight > 0:
        terms = terms + torch.stack(
            [
                group_mass_loss(
                    p, task_types_B, group_of_expert=groups, weight=cfg.group_mass_weight, mask_BT=mask_BT
                )
                for p in probs.values()
            ]
        )
    return terms.sum() if cfg.lbc_reduction == "sum" else terms.mean()
