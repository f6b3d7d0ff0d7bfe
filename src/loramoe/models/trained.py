"""Loading a trained output for inference: a base alone, a base plus a loramoe or PEFT adapter, or a fully
fine-tuned model."""

from __future__ import annotations

import os
from pathlib import Path

from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from loramoe.adapter import load_adapter as _load_adapter
from loramoe.errors import AdapterError, ConfigError, LoRAMoEError
from loramoe.files import read_json
from loramoe.hub import adapter_folder
from loramoe.models.base import DTYPES, MODEL_SAFETENSORS, load_base
from loramoe.weights import weights_format


def load_trained(
    path: str | os.PathLike | None,
    *,
    base: str | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    revision: str | None = None,
    quantization: str | None = None,
):
    """Load a model for inference: a base alone, a base plus a loramoe or PEFT adapter, or a fully fine-tuned model.

    Args:
        path: a training output directory or adapter directory (None: the base alone), or a Hugging Face Hub
            repository id (``org/name``) of a loramoe or PEFT adapter, fetched into the Hub cache; an existing
            directory of that name wins (``loramoe.hub``).
        base: the base model; default: the one recorded in the adapter (``base_model.name_or_path``).
        dtype: as in ``load_base``.
        allow_pickle: read pickle-format weights of the base, a PEFT adapter or a full fine-tuning output (never
            of a loramoe adapter) with ``torch.load(weights_only=True)``; off by default (``loramoe.weights``).
        revision: branch, tag or commit when ``path`` is a Hub repository id; default ``main``.
        quantization: load the base with ``"4bit"`` or ``"8bit"`` linears (as in ``load_base``); an adapter trained
            on either a quantized or a float base loads onto either.

    Returns:
        ``(model, tokenizer)`` in eval mode.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if path is None:
        if base is None:
            raise ConfigError("give a base model (--model) or an adapter directory (--adapter)")
        if revision is not None:
            raise ConfigError("revision applies to an adapter from the Hub; give --adapter with it")
        return load_base(base, dtype=dtype, allow_pickle=allow_pickle, quantization=quantization)
    folder = adapter_folder(path, revision=revision, files=(CONFIG_NAME, WEIGHTS_NAME))
    if not folder.is_dir():
        raise AdapterError(
            f"{folder}: adapter directory not found; give a training output or adapter directory"
        )
    config_file = folder / CONFIG_NAME
    if config_file.is_file():
        meta = read_json(config_file, error=AdapterError, what="adapter config")
        if isinstance(meta, dict) and "peft_type" in meta:  # the LoRA baseline
            return _load_peft(folder, meta, base, dtype, allow_pickle, quantization)
        _, meta = read_adapter_config(folder)
        name = base or (meta.get("base_model") or {}).get("name_or_path")
        if not name:
            raise AdapterError(f"{config_file}: the adapter does not name its base model; pass --model")
        model, tokenizer = _load_named_base(
            name, base is None, config_file, dtype, allow_pickle, quantization
        )
        return _load_adapter(model, folder).eval(), tokenizer
    if (folder / "config.json").is_file():  # full fine-tuning output
        weights_format(folder, MODEL_SAFETENSORS, allow_pickle=allow_pickle, what="model")
        return _third_party_load(
            folder / "config.json",
            lambda: load_base(str(folder), dtype=dtype, allow_pickle=allow_pickle, quantization=quantization),
        )
    if weights_format(folder, (WEIGHTS_NAME,), what="adapter"):
        raise AdapterError(
            f"{config_file}: missing; an adapter needs it next to {WEIGHTS_NAME}. Copy it from the training "
            "output directory"
        )
    raise AdapterError(
        f"{folder}: neither an adapter ({CONFIG_NAME}) nor a model directory (config.json); give the training "
        "output directory"
    )


def _load_named_base(
    name: str, from_adapter: bool, config_file: Path, dtype: str, allow_pickle: bool, quantization: str | None
):
    """``load_base``; when the adapter chose the base, a failure says so (the user never typed that name)."""

    try:
        return load_base(name, dtype=dtype, allow_pickle=allow_pickle, quantization=quantization)
    except ConfigError as err:
        if not from_adapter:
            raise
        reason = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"{config_file}: its base model {name!r} cannot be loaded here ({reason}); pass --model with the "
            "base it was trained on"
        ) from err


def _third_party_load(path: Path, load):
    """Run a PEFT / transformers loader; what it raises about damaged files becomes an AdapterError naming them."""
    try:
        return load()
    except LoRAMoEError as err:
        if not isinstance(err, ConfigError):  # load_base's ConfigError: the model directory is unreadable
            raise
        reason = (str(err).splitlines() or [""])[0]
        raise AdapterError(
            f"{path.parent}: cannot load ({reason}); use an intact copy of the training output"
        ) from err
    except Exception as err:  # safetensors, PEFT and transformers raise many types for a damaged file
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise AdapterError(
            f"{path.parent}: cannot load ({type(err).__name__}: {reason}); the files are damaged or incomplete, "
            "use an intact copy of the training output"
        ) from err


def _load_peft(
    folder: Path, meta: dict, base: str | None, dtype: str, allow_pickle: bool, quantization: str | None
):

    name = base or meta.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise AdapterError(
            f"{folder / 'adapter_config.json'}: the adapter does not name its base model; pass --model"
        )
    # PEFT reads adapter_model.safetensors when it is there, and torch.load(weights_only=True) of the .bin otherwise
    weights_format(folder, ("adapter_model.safetensors",), allow_pickle=allow_pickle, what="adapter")
    model, tokenizer = _load_named_base(
        name, base is None, folder / "adapter_config.json", dtype, allow_pickle, quantization
    )

    def load():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)).eval()

    return _third_party_load(folder / "adapter_config.json", load), tokenizer
