"""Adapters of models whose parameters a training engine has sharded: FSDP2 (``DTensor`` parameters) and the
full state a Trainer gathers under FSDP or DeepSpeed ZeRO-3.

The adapter file format and its checks are the core's (``loramoe.adapter``); this module only turns sharded
parameters into whole tensors for it (saving) and whole tensors back into shards (loading on resume).

Design decisions:
- Gathering a ``DTensor`` is a collective, so every rank calls ``save_sharded_adapter``; rank 0 writes.
- A tensor that is not whole (a partitioned ZeRO-3 parameter, an empty placeholder) stops the save with the
  accelerate setting that fixes it: no adapter is written from a part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from loramoe.adapter import FILE_KEYS, read_adapter_weights, save_adapter
from loramoe.errors import TrainingError
from loramoe.inject import adapted_modules, adapter_parameters

_ZERO3_ADVICE = "DeepSpeed ZeRO-3: set zero3_save_16bit_model: true in the accelerate config"


def gathered_adapter_state(
    model: nn.Module, model_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """File-format tensors (``M.lora_A``, ``M.lora_B``, ``M.router``), whole, contiguous, on the CPU.

    Args:
        model: an adapted model. Parameters sharded by FSDP2 (``DTensor``) are gathered: a collective, so every
            rank must call this.
        model_state: the model's full ``state_dict`` already gathered by a training engine (the Trainer's save
            under FSDP or DeepSpeed ZeRO-3); the adapter tensors are taken from it instead of the parameters.

    Raises:
        TrainingError: a tensor is not whole; the adapter was not written.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_modules(model).items():
        for param_name, file_name in FILE_KEYS.items():
            param = getattr(layer, param_name)
            if model_state is not None:
                tensor = model_state[_state_key(model_state, f"{name}.{param_name}")]
            else:
                tensor = param.full_tensor() if isinstance(param, DTensor) else param
            if tuple(tensor.shape) != tuple(param.shape) or tensor.numel() == 0:
                raise TrainingError(
                    f"{name}.{param_name} has shape {tuple(tensor.shape)}, the layer needs {tuple(param.shape)}: "
                    f"the parameter is partitioned and was not gathered ({_ZERO3_ADVICE}); the adapter was not "
                    "written"
                )
            state[f"{name}.{file_name}"] = tensor.detach().cpu().contiguous()
    return state


def _state_key(model_state: dict[str, torch.Tensor], key: str) -> str:
    """``key`` as it appears in an engine's state dict (which may keep a wrapper prefix such as ``module.``)."""
    if key in model_state:
        return key
    matches = [k for k in model_state if k.endswith("." + key)]
    if len(matches) != 1:
        raise TrainingError(
            f"the model state gathered for saving has no single entry for {key} (found {matches[:3]}); with "
            f"{_ZERO3_ADVICE}. The adapter was not written"
        )
    return matches[0]


def save_sharded_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_name_or_path: str | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    data_summary: Mapping[str, Any] | None = None,
) -> Path:
    """``loramoe.adapter.save_adapter`` for a sharded model: call it on every rank; the shards are gathered and
    rank 0 writes. Also right for an unsharded model (then it is ``save_adapter``).

    Args:
        model: an adapted model, its parameters possibly ``DTensor`` shards (FSDP2).
        out_dir: destination directory.
        base_name_or_path: recorded as the base model's name (default: the model's own ``name_or_path``).
        model_state: a full ``state_dict`` gathered by a training engine (see ``gathered_adapter_state``).
        data_summary: the training data summary for the adapter's model card.

    Returns:
        The directory.
    """
    tensors = gathered_adapter_state(model, model_state)  # gathers on every rank before any rank returns
    if dist.is_initialized() and dist.get_rank() != 0 and is_sharded(model):
        return Path(out_dir)
    return save_adapter(
        model, out_dir, base_name_or_path=base_name_or_path, tensors=tensors, data_summary=data_summary
    )


def load_sharded_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """``loramoe.adapter.load_adapter_weights`` into parameters that may be ``DTensor`` shards (FSDP2): each rank
    keeps its own shard of the whole saved tensor."""
    state = read_adapter_weights(model, adapter_dir)
    with torch.no_grad():
        for name, layer in adapted_modules(model).items():
            for param_name, file_name in FILE_KEYS.items():
                param, value = getattr(layer, param_name), state[f"{name}.{file_name}"]
                if isinstance(param, DTensor):
                    value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                param.copy_(value)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any adapter parameter is an FSDP2 shard (``DTensor``)."""
    return any(isinstance(p, DTensor) for p in adapter_parameters(model).values())
