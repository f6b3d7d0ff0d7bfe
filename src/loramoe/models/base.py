"""Loading a base causal LM with its tokenizer, by alias, local directory or hub name.

Models loaded from an alias are named by the alias (``model.name_or_path``), not by the machine-specific cache
path, so an adapter saved on one machine names a base model another machine can resolve.
"""

from __future__ import annotations

import os
import pickle  # only for its exception type: nothing here unpickles
from typing import TYPE_CHECKING

import torch

from loramoe.errors import ConfigError
from loramoe.files import read_json
from loramoe.models.bundled import DEFAULT_MODEL, canonical_name, resolve_model
from loramoe.models.quantization import bnb_config
from loramoe.weights import SAFETENSORS, weights_format

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16", "auto")
MODEL_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")  # what transformers reads


def load_base(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, resolving the default alias first.

    The tokenizer's padding side is left alone (generation pads on the left by itself).

    Args:
        name_or_path: Model alias, local directory or hub name (see :func:`resolve_model`).
        dtype: ``float32`` (default; bfloat16 matmuls are 20-90x slower on most CPUs), ``bfloat16``, ``float16``,
            or ``auto``: bfloat16 on a CUDA device that supports it, float16 on other CUDA devices, else float32.
        device: Where to put the model; ``None`` means ``cuda`` if available, else ``cpu``.
        cache_dir: Cache root for the converted default model (see :func:`resolve_model`).
        allow_pickle: read pickle-format weights (``pytorch_model.bin``) when there are no safetensors, through
            ``torch.load(weights_only=True)``; off by default, when such a model is refused (``loramoe.weights``).
        quantization: ``"4bit"`` (NF4, computing in ``dtype``) or ``"8bit"`` (LLM.int8) linears through
            bitsandbytes (``loramoe.models.quantization``), loaded straight onto ``device``; None: unquantized.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode, a pad token set (the eos token if it had none), and
        ``model.name_or_path`` / ``model.config._name_or_path`` set to the canonical name of the model.

    Raises:
        ConfigError: Unknown ``dtype`` or ``quantization``, bitsandbytes missing for a quantized base, or the model
            cannot be found or loaded.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype, device)
    path = resolve_model(name_or_path, cache_dir=cache_dir)
    # The loading gate: safetensors only, unless the user opted in; a local pickle-only model is refused by name,
    # and transformers is told to read nothing but safetensors, so a pickle beside them is never opened.
    fmt = weights_format(path, MODEL_SAFETENSORS, allow_pickle=allow_pickle, what="model", error=ConfigError)
    # A local config.json read as loramoe reads any user JSON first: transformers would keep the last of a key given
    # twice (a vocab_size that then fails to fit the weights) and stop at a huge integer with a Python message.
    config_json = os.path.join(path, "config.json")
    if os.path.isfile(config_json):
        read_json(config_json, error=ConfigError, what="model config", constants=True)
    use_safetensors = None if allow_pickle and fmt != SAFETENSORS else True
    placement = {}
    if quantization is not None:  # quantized as they load, on the device they will run on
        placement = {"quantization_config": bnb_config(quantization, torch_dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=use_safetensors, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    # UnpicklingError: an opted-in pickle that torch.load(weights_only=True) refused
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load model {name_or_path!r}: {first_line} (use {DEFAULT_MODEL!r} for the bundled offline "
            "default)"
        ) from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = canonical_name(name_or_path)
    model.config.name_or_path = name  # stored as config._name_or_path
    model.name_or_path = name
    tokenizer.name_or_path = name
    return (model if quantization is not None else model.to(device)).eval(), tokenizer


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings`` or ``n_positions``), if its config says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device
