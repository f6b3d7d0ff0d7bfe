"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, written atomically, loaded as data only.

File format (for each adapted module ``M``, named as in the base model's ``named_modules()``):

    M.lora_A   (N, R, D_in)    float32 by default
    M.lora_B   (N, D_out, R)
    M.router   (N, D_in)

``adapter_config.json`` holds ``{"format": "loramoe", "loramoe_version", "config": LoRAMoEConfig,
"base_model": {model_type, hidden_size, intermediate_size, num_hidden_layers, vocab_size, name_or_path},
"weights_sha256"}``. The checksum lets a loader tell a torn or tampered weight file from a good one.

Design decisions:
- Loading never unpickles: safetensors and JSON only (``loramoe.weights``); a ``.bin``/``.pt`` adapter is refused
  with the reason.
- Loading is strict: every field of ``adapter_config.json`` must be there (defaults only as its format version
  documents, ``_FORMAT_DEFAULTS``), and the base model's
  identity and every tensor's name, shape, floating dtype and finiteness are checked; every mismatch is listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramoe._version import __version__
from loramoe.card import write_model_card
from loramoe.config import LoRAMoEConfig
from loramoe.dirlock import held_if_locked
from loramoe.errors import AdapterError, ConfigError
from loramoe.files import atomic_path, atomic_write_text, read_json, sha256_file
from loramoe.hub import adapter_folder
from loramoe.inject import adapted_modules, adapter_parameters, check_model, get_config, inject, model_type_of
from loramoe.validation import boolean, check_value, is_int, shown
from loramoe.weights import weights_format

CONFIG_NAME = "adapter_config.json"
# The adapter_config.json layout written now; files without ``format_version`` are format 1.
FORMAT_VERSION = 3
# Per format, the config fields a file of that format may leave out and the value it was trained with. Format 1
# (before ``format_version`` was written) predates ``lbc_positions``: those adapters counted every position. Formats
# 1 and 2 predate ``group_mass_weight``: they trained without it. Every other field is required in every format: a
# default that differs from the trained value gives a wrong model.
_FORMAT_DEFAULTS: dict[int, dict[str, object]] = {
    1: {"lbc_positions": "all", "group_mass_weight": 0.0},
    2: {"group_mass_weight": 0.0},
    3: {},
}
MAX_CONFIG_BYTES = 1 << 20
WEIGHTS_NAME = "adapter_model.safetensors"
IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(LoRAMoEConfig))
_ALIASES = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",), "intermediate_size": ("n_inner",)}


def _check_path(value: Any, name: str) -> None:
    """An adapter directory argument: a non-empty str or path (``""`` would be the working directory)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise AdapterError(
            f"{name} must be a directory path (a non-empty str or os.PathLike), got {shown(value)}"
        )


def base_identity(model: nn.Module) -> dict[str, object]:
    """The facts about the base model an adapter depends on."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    identity: dict[str, object] = {"model_type": model_type_of(model)}
    for key in IDENTITY_KEYS[1:]:
        value = getattr(config, key, None)
        for alias in _ALIASES.get(key, ()):
            value = value if value is not None else getattr(config, alias, None)
        identity[key] = value
    identity["name_or_path"] = (
        getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    )
    return identity


FILE_KEYS = {"loramoe_A": "lora_A", "loramoe_B": "lora_B", "loramoe_router": "router"}  # parameter -> file


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """File-format tensors (``M.lora_A``, ``M.lora_B``, ``M.router``) of the model's own parameters, on the CPU.

    Parameters sharded by a training engine (FSDP2, DeepSpeed ZeRO-3) are gathered by
    ``loramoe.training.sharded.gathered_adapter_state`` instead.
    """
    return {
        f"{name}.{file_name}": getattr(layer, param_name).detach().cpu().contiguous()
        for name, layer in adapted_modules(model).items()
        for param_name, file_name in FILE_KEYS.items()
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_name_or_path: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    data_summary: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
) -> Path:
    """Write the adapter of ``model`` to ``out_dir`` (created if needed), each file atomically, with a model card.

    A model whose parameters a training engine has sharded (FSDP2, DeepSpeed ZeRO-3) is saved with
    ``loramoe.training.sharded.save_sharded_adapter``, which gathers the shards and writes through this function.

    The card is ``README.md`` (``loramoe.card``): Hub front matter, the method, base model, config, the data
    summary and the evaluation figures when given. A ``README.md`` already in ``out_dir`` that is not a loramoe card
    is kept, with a warning.

    Args:
        model: an adapted model.
        out_dir: destination directory.
        base_name_or_path: recorded as the base model's name (default: the model's own ``name_or_path``).
        tensors: the file-format tensors to write, whole (default: ``adapter_state_dict(model)``).
        data_summary: the training data summary for the card (``DataStats.to_dict()``; the trainer passes it).
        results: the adapter's evaluation for the card (``loramoe.eval.evaluate.evaluate_benchmarks``'s result).

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    check_model(model, "save_adapter()")
    _check_path(out_dir, "out_dir")
    if base_name_or_path is not None and not isinstance(base_name_or_path, (str, os.PathLike)):
        raise ConfigError(
            f"base_name_or_path must be a name, a path or None, got {type(base_name_or_path).__name__}"
        )
    for name, value in (("tensors", tensors), ("data_summary", data_summary), ("results", results)):
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping or None, got {type(value).__name__}")
    cfg = get_config(model)
    tensors = adapter_state_dict(model) if tensors is None else tensors
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: is a file; save_adapter writes a directory, give a directory path")
    out.mkdir(parents=True, exist_ok=True)
    identity = base_identity(model)
    if base_name_or_path is not None:
        identity["name_or_path"] = str(base_name_or_path)
    # A training run's output directory is written only by the process holding its lock (the run itself).
    with held_if_locked(out, what="adapter directory", error=AdapterError):
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            digest = sha256_file(tmp)
        meta = {
            "format": "loramoe",
            "format_version": FORMAT_VERSION,
            "loramoe_version": __version__,
            "config": cfg.to_dict(),
            "base_model": identity,
            "weights_sha256": digest,
        }
        atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        write_model_card(out, data=data_summary, results=results)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoRAMoEConfig, dict]:
    """Parse and validate ``adapter_config.json``; returns (config, the whole JSON document).

    The file is strict: every ``LoRAMoEConfig`` field (less those its format version defines, ``_FORMAT_DEFAULTS``),
    every base-model identity key and the weights' checksum must be present. A missing field is an error, never a
    default, because a default that differs from the trained value (alpha 32 for a saved 8) gives a silently wrong
    model.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise AdapterError(
            f"{adapter_dir}: adapter directory not found (and not a Hub repository id, org/name); give the "
            "directory save_adapter wrote"
        )
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = read_json(path, error=AdapterError, what="adapter config", max_bytes=MAX_CONFIG_BYTES)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "loramoe"
        or not isinstance(meta.get("config"), dict)
    ):
        raise AdapterError(
            f"{path}: not a loramoe adapter config (expected 'format': 'loramoe' and a 'config' object)"
        )
    version = meta.get("format_version", 1)
    if not is_int(version) or version not in _FORMAT_DEFAULTS:  # `true` would pass for 1 as a dict key
        raise AdapterError(
            f"{path} field 'format_version': {shown(version)} is not a format this loramoe reads "
            f"({', '.join(map(str, _FORMAT_DEFAULTS))}); load it with the loramoe version that saved it, or upgrade "
            "loramoe"
        )
    if not isinstance(meta.get("base_model", {}), dict):
        raise AdapterError(
            f"{path} field 'base_model': must be an object; the file was edited, save the adapter again"
        )
    unknown = sorted(set(meta["config"]) - set(_CONFIG_FIELDS))
    if unknown:
        raise AdapterError(
            f"{path} field 'config': unknown key(s) {unknown}; valid keys: {list(_CONFIG_FIELDS)}"
        )
    # Fields a format lets a file leave out, with the value every file of that format was trained with.
    saved = {**_FORMAT_DEFAULTS[version], **meta["config"]}
    missing = [f"config.{name}" for name in _CONFIG_FIELDS if name not in saved]
    base = meta.get("base_model", {})
    missing += [f"base_model.{key}" for key in (*IDENTITY_KEYS, "name_or_path") if key not in base]
    missing += [] if "weights_sha256" in meta else ["weights_sha256"]
    if missing:
        raise AdapterError(
            f"{path} field {missing[0]!r}: missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            "every field of the adapter's config is required (a default could differ from the trained value). "
            "Restore the file from the training output, or save the adapter again"
        )
    digest = meta["weights_sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise AdapterError(f"{path} field 'weights_sha256': must be a SHA-256 hex digest, got {digest!r}")
    # TypeError: a value of the wrong kind that the config's own checks do not catch
    try:
        cfg = LoRAMoEConfig.from_dict(saved)
    except (ConfigError, TypeError) as err:
        raise AdapterError(f"{path} field 'config': {err}") from err
    return cfg, meta


def _check_identity(model: nn.Module, saved: dict, path: Path) -> None:
    current = base_identity(model)
    problems = [
        f"{key}: adapter was trained on {saved.get(key)!r}, this model has {current.get(key)!r}"
        for key in IDENTITY_KEYS
        if saved.get(key) is not None and current.get(key) is not None and saved.get(key) != current.get(key)
    ]
    if problems:
        raise AdapterError(
            f"{path}: this adapter was made for a different base model ({saved.get('name_or_path')}): "
            + "; ".join(problems)
            + ". Load it onto the base it was trained on."
        )


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    is_trainable: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Inject LoRAMoE into ``model`` as saved in ``adapter_dir`` and load the weights (data only, no pickle).

    Args:
        model: the base model the adapter was trained on (not yet adapted).
        adapter_dir: a directory written by ``save_adapter``, or a Hugging Face Hub repository id (``org/name``)
            holding one, fetched into the Hub cache (an existing directory of that name wins; ``loramoe.hub``).
        is_trainable: keep the adapter trainable (to continue training); otherwise it is frozen too.
        revision: branch, tag or commit of a Hub repository; default ``main``.

    Returns:
        The same model, adapted.

    Raises:
        AdapterError: missing, torn, tampered, pickled or mismatched files, or a Hub repository that cannot be
            fetched (offline and not cached); the message says what and where.
    """
    check_model(model, "load_adapter()")
    _check_path(adapter_dir, "adapter_dir")
    check_value("is_trainable", is_trainable, boolean())
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise AdapterError(
            f"revision must be a branch, tag or commit name (a non-empty str), got {shown(revision)}"
        )
    adapter_dir = adapter_folder(adapter_dir, revision=revision, files=(CONFIG_NAME, WEIGHTS_NAME))
    weights = adapter_dir / WEIGHTS_NAME
    weights_format(adapter_dir, (WEIGHTS_NAME,), what="adapter")  # a pickle-only adapter is refused, by name
    cfg, meta = read_adapter_config(adapter_dir)
    _check_identity(model, meta.get("base_model") or {}, adapter_dir / CONFIG_NAME)
    state = _read_weights(adapter_dir, meta)
    try:
        inject(model, cfg)
    except ConfigError as err:  # e.g. an absurd size for this base model, refused before allocating
        raise AdapterError(f"{adapter_dir / CONFIG_NAME} field 'config': {err}") from err
    try:
        check_weights_fit(model, state, weights)
    except AdapterError:
        _uninject(model)
        raise
    _copy_weights(model, state)
    for param in adapter_parameters(model).values():
        param.requires_grad_(is_trainable)
    return model


def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load saved weights into a model that already has the same LoRAMoE layers (e.g. to resume training).

    Raises:
        AdapterError: as ``load_adapter``, and when the saved config differs from the model's.
    """
    _copy_weights(model, read_adapter_weights(model, adapter_dir))
    return model


def read_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The saved file-format tensors, checked against a model that already has the same LoRAMoE layers.

    Raises:
        AdapterError: as ``load_adapter``, and when the saved config differs from the model's.
    """
    adapter_dir = Path(adapter_dir)
    cfg, meta = read_adapter_config(adapter_dir)
    if cfg != get_config(model):
        raise AdapterError(f"{adapter_dir / CONFIG_NAME}: the saved LoRAMoE config differs from this model's")
    state = _read_weights(adapter_dir, meta)
    check_weights_fit(model, state, adapter_dir / WEIGHTS_NAME)
    return state


def _read_weights(adapter_dir: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing; save the adapter again or point to the right directory")
    if sha256_file(weights) != meta["weights_sha256"]:
        raise AdapterError(
            f"{weights}: checksum does not match {CONFIG_NAME} (the file is truncated, torn by a crash or was "
            "modified); use an intact copy or re-save the adapter"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({err}); it is truncated or damaged"
        ) from err


def check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Raise ``AdapterError`` listing every tensor of ``state`` that is missing, unexpected, of the wrong shape or
    dtype, or not finite for the LoRAMoE layers of ``model``."""
    expected = {
        f"{name}.{file_name}": tuple(getattr(layer, param_name).shape)
        for name, layer in adapted_modules(model).items()
        for param_name, file_name in FILE_KEYS.items()
    }
    problems = [f"missing tensor {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected tensor {k}" for k in sorted(set(state) - set(expected))]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} in the file, {shape} expected"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    for k in sorted(set(state) & set(expected)):
        if not state[k].is_floating_point():
            problems.append(f"{k}: dtype {state[k].dtype}, a floating-point tensor expected")
        elif not bool(torch.isfinite(state[k]).all()):
            problems.append(f"{k}: holds NaN or infinite values")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise AdapterError(f"{weights}: does not fit this model: {shown}")


def _copy_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in adapted_modules(model).items():
            for param_name, file_name in FILE_KEYS.items():
                getattr(layer, param_name).copy_(state[f"{name}.{file_name}"])


def _uninject(model: nn.Module) -> None:
    """Put the original modules back when a load fails half way (the base stays frozen)."""
    for name, layer in adapted_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "loramoe_config"):
        delattr(model, "loramoe_config")
