"""Adapting a stock transformers model in place: target resolution, wrapping, freezing, disabling, summary.

Design decisions:
- Targets come from an explicit ``model_type`` map (``config.FFN_TARGETS``) unless the user names them; a name
  matches a module exactly or as a dotted suffix. Zero matches is an error listing the linear layers seen.
- Everything but the adapter is frozen; adapter parameters are found by one name prefix (``loramoe_``).
- The config travels on the model as ``model.loramoe_config`` so ``compute_loss`` and ``save_adapter`` need
  nothing else.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loramoe.config import FFN_TARGETS, LoRAMoEConfig
from loramoe.errors import ConfigError, TargetError
from loramoe.layer import ADAPTER_PREFIX, LoRAMoELinear, is_linear_like, linear_features
from loramoe.validation import is_int, parse_int, shown

CONFIG_ATTR = "loramoe_config"


def check_model(model: Any, what: str) -> None:
    """Raise ``ConfigError`` unless ``model`` is a torch module: a name or path is not a loaded model."""
    if isinstance(model, nn.Module):
        return
    hint = (
        "; load the model first (transformers AutoModelForCausalLM.from_pretrained, loramoe.models.base.load_base)"
        if isinstance(model, (str, os.PathLike))
        else ""
    )
    raise ConfigError(f"{what} needs a model (a torch nn.Module), got {type(model).__name__}{hint}")


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_targets(model: nn.Module, cfg: LoRAMoEConfig) -> list[str]:
    """Full names of the modules ``cfg`` adapts in ``model``, in ``named_modules()`` order.

    Raises:
        TargetError: the architecture is unknown and no targets were given, or the targets match nothing.
    """
    linears = [name for name, module in model.named_modules() if is_linear_like(module)]
    seen = ", ".join(
        f"{leaf} (x{count})" for leaf, count in Counter(n.rsplit(".", 1)[-1] for n in linears).items()
    )
    targets = cfg.target_modules
    if targets is None:
        model_type = model_type_of(model)
        if model_type not in FFN_TARGETS:
            raise TargetError(
                f"no known feed-forward targets for model_type {model_type!r} (known: {sorted(FFN_TARGETS)}); set "
                f"target_modules to some of the linear layers found: {seen}"
            )
        targets = FFN_TARGETS[model_type]
    matched = [name for name in linears if any(name == t or name.endswith("." + t) for t in targets)]
    if not matched:
        raise TargetError(f"target_modules {list(targets)} matched no linear layer; the model has: {seen}")
    return matched


def inject(model: nn.Module, cfg: LoRAMoEConfig) -> nn.Module:
    """Adapt ``model`` in place with LoRAMoE experts on ``cfg``'s targets and freeze everything else.

    Args:
        model: a transformers causal LM (or any module with linear layers).
        cfg: the adapter configuration.

    Returns:
        The same ``model`` object, adapted, with ``model.loramoe_config = cfg``.
    """
    check_model(model, "inject()")
    if not isinstance(cfg, LoRAMoEConfig):
        raise ConfigError(f"inject() needs a LoRAMoEConfig, got {type(cfg).__name__}")
    if adapted_modules(model):
        raise ConfigError("this model already has LoRAMoE layers; load a fresh base model to inject again")
    names = resolve_targets(model, cfg)
    check_adapter_size(model, cfg, names)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRAMoELinear(
            base,
            num_experts=cfg.num_experts,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            dropout_mode=cfg.dropout_mode,
            top_k=cfg.top_k,
        )
        layer.train(base.training)  # a new module starts in train mode; follow the model's (eval: no dropout)
        setattr(parent, child, layer)
    setattr(model, CONFIG_ATTR, cfg)
    return model


MAX_ADAPTER_RATIO = 10  # an "adapter" with ten times its base model's parameters is a mistake, not an adapter


def check_adapter_size(model: nn.Module, cfg: LoRAMoEConfig, names: list[str]) -> None:
    """Refuse, before anything is allocated, an adapter with more than ``MAX_ADAPTER_RATIO`` times the base
    model's parameters (a million experts from a mistyped or hostile config would ask for hundreds of GB)."""
    shapes = [linear_features(model.get_submodule(n)) for n in names]
    adapter = sum(cfg.num_experts * (cfg.rank * (d_in + d_out) + d_in) for d_in, d_out in shapes)
    base = sum(p.numel() for p in model.parameters())
    if adapter > MAX_ADAPTER_RATIO * max(base, 1):
        raise ConfigError(
            f"num_experts={cfg.num_experts} and rank={cfg.rank} on {len(names)} linears would make an adapter of "
            f"{adapter:,} parameters, more than {MAX_ADAPTER_RATIO}x the base model's {base:,}; lower num_experts "
            "or rank"
        )


def get_config(model: nn.Module) -> LoRAMoEConfig:
    """The LoRAMoEConfig of an adapted model (looking through DDP/FSDP-style ``.module`` wrappers)."""
    check_model(model, "loramoe")
    cfg = getattr(model, CONFIG_ATTR, None)
    while cfg is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
        cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ConfigError(
            "this model has no LoRAMoE adapter; call loramoe.inject() or loramoe.load_adapter() first"
        )
    return cfg


def adapted_modules(model: nn.Module) -> dict[str, LoRAMoELinear]:
    """Name in ``model.named_modules()`` -> LoRAMoE layer, in model order."""
    check_model(model, "loramoe")
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRAMoELinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter, by its full name (all contain the ``loramoe_`` prefix)."""
    return {
        name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)
    }


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base output; the previous state is restored after."""
    check_model(model, "disable_adapters()")
    layers = list(adapted_modules(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def experts_spec(value: str | Sequence[int]) -> str | list[int]:
    """A command-line or config value for :func:`disable_experts`: a group name stays a name; ``"0,2"`` (integers
    separated by commas) and lists of ints become indices.

    Raises:
        ConfigError: an empty value, or a list that is not all integers.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigError(
                "experts_off is empty; give an expert group name (knowledge, downstream) or indices like 0,2"
            )
        parts = [p.strip() for p in text.split(",")]
        if "" in parts:
            raise ConfigError(
                f"experts_off {shown(value)} has an empty item; give an expert group name or indices like 0,2"
            )
        indices = [parse_int(p, "experts_off") for p in parts]
        return text if None in indices else indices
    if isinstance(value, Sequence) and value and all(is_int(e) for e in value):
        return list(value)
    raise ConfigError(f"experts_off must be an expert group name or a list of expert indices, got {value!r}")


@contextlib.contextmanager
def disable_experts(model: nn.Module, group: str | Sequence[int]) -> Iterator[nn.Module]:
    """Inside the block the given experts are switched off in every LoRAMoE layer: the router's softmax runs over
    the remaining experts only (their probabilities renormalised to sum to 1), as if the others did not exist.

    Args:
        model: a model with LoRAMoE layers.
        group: an expert group by its task name (binary mode: ``"downstream"`` = the first half of the experts,
            ``"knowledge"`` = the second), or expert indices (``[0, 2]``).

    Raises:
        ConfigError: no LoRAMoE layers, an unknown group name, an index out of range, or every expert off.
    """
    check_model(model, "disable_experts()")
    cfg = get_config(model)
    n = cfg.num_experts
    if isinstance(group, str):
        if group not in cfg.task_names:
            raise ConfigError(
                f"unknown expert group {group!r}; this adapter's groups are {list(cfg.task_names)} (or give indices)"
            )
        off = [e for e, k in enumerate(cfg.group_of_expert()) if cfg.task_names[k] == group]
    elif not isinstance(group, Sequence) or isinstance(group, (bytes, bytearray)):
        raise ConfigError(
            f"disable_experts needs an expert group name {list(cfg.task_names)} or a list of expert indices in "
            f"[0, {n}), got {shown(group)}"
        )
    else:
        off = list(group)
        bad = [e for e in off if not is_int(e) or not 0 <= e < n]
        if bad or not off:
            raise ConfigError(
                f"expert indices must be a non-empty list of ints in [0, {n}); got {shown(list(group))}"
            )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[off] = True
    if mask.all():
        raise ConfigError(f"switching off {sorted(set(off))} leaves no expert of {n}; keep at least one on")
    layers = list(adapted_modules(model).values())
    before = [layer.experts_off for layer in layers]
    for layer in layers:
        layer.experts_off = mask if layer.experts_off is None else layer.experts_off | mask
        if layer.experts_off.all():
            for restore, state in zip(layers, before):
                restore.experts_off = state
            raise ConfigError(
                f"switching off {sorted(set(off))} on top of the experts already off leaves none on"
            )
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.experts_off = state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def summary(model: nn.Module) -> str:
    """A human-readable description of the adapter: targets, experts, trainable and total parameters."""
    check_model(model, "summary()")
    cfg = get_config(model)
    layers = adapted_modules(model)
    leaves = Counter(name.rsplit(".", 1)[-1] for name in layers)
    adapter = sum(p.numel() for p in adapter_parameters(model).values())
    trainable, total = count_parameters(model)
    routing = "dense" if cfg.top_k is None else f"top-{cfg.top_k}"
    groups = " + ".join(f"{size} {name}" for name, size in zip(cfg.task_names, cfg.group_sizes))
    return "\n".join(
        [
            f"LoRAMoE on {model_type_of(model) or type(model).__name__}: {len(layers)} adapted linears "
            f"({', '.join(f'{k} x{v}' for k, v in leaves.items())})",
            f"  experts {cfg.num_experts} ({groups}), rank {cfg.rank}, alpha {cfg.alpha:g}, dropout {cfg.dropout} "
            f"({cfg.dropout_mode}), routing {routing}",
            f"  LBC delta {cfg.lbc_delta}, weight {cfg.lbc_weight} ({cfg.lbc_normalization}, {cfg.lbc_reduction})",
            f"  adapter parameters {adapter:,}; trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        ]
    )
