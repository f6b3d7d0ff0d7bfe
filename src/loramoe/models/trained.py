"""Loading a trained output for inference: a base alone, a base plus a loramoe or PEFT adapter, or a fully
fine-tuned model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loramoe.adapter import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, read_adapter_config
from loramoe.adapter import load_adapter as _load_adapter
from loramoe.errors import AdapterError, ConfigError, LoRAMoEError
from loramoe.models.base import DTYPES, load_base


def load_trained(path: str | os.PathLike | None, *, base: str | None = None, dtype: str = "float32"):
    """Load a model for inference: a base alone, a base plus a loramoe or PEFT adapter, or a fully fine-tuned model.

    Args:
        path: a training output directory or adapter directory (None: the base alone).
        base: the base model; default: the one recorded in the adapter (``base_model.name_or_path``).
        dtype: as in ``load_base``.

    Returns:
        ``(model, tokenizer)`` in eval mode.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if path is None:
        if base is None:
            raise ConfigError("give a base model (--model) or an adapter directory (--adapter)")
        return load_base(base, dtype=dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(
            f"{folder}: adapter directory not found; give a training output or adapter directory"
        )
    config_file = folder / CONFIG_NAME
    if config_file.is_file():
        meta = _read_json(config_file)
        if isinstance(meta, dict) and "peft_type" in meta:  # the LoRA baseline
            return _load_peft(folder, meta, base, dtype)
        _, meta = read_adapter_config(folder)
        name = base or (meta.get("base_model") or {}).get("name_or_path")
        if not name:
            raise AdapterError(f"{config_file}: the adapter does not name its base model; pass --model")
        model, tokenizer = _load_named_base(name, base is None, config_file, dtype)
        return _load_adapter(model, folder).eval(), tokenizer
    if (folder / "config.json").is_file():  # full fine-tuning output
        _refuse_pickle_only(folder, "model.safetensors")
        return _third_party_load(folder / "config.json", lambda: load_base(str(folder), dtype=dtype))
    if (folder / WEIGHTS_NAME).is_file() or any((folder / n).is_file() for n in PICKLE_NAMES):
        _refuse_pickle_only(folder, WEIGHTS_NAME)
        raise AdapterError(
            f"{config_file}: missing; an adapter needs it next to {WEIGHTS_NAME}. Copy it from the training "
            "output directory"
        )
    raise AdapterError(
        f"{folder}: neither an adapter ({CONFIG_NAME}) nor a model directory (config.json); give the training "
        "output directory"
    )


def _load_named_base(name: str, from_adapter: bool, config_file: Path, dtype: str):
    """``load_base``; when the adapter chose the base, a failure says so (the user never typed that name)."""

    try:
        return load_base(name, dtype=dtype)
    except ConfigError as err:
        if not from_adapter:
            raise
        reason = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"{config_file}: its base model {name!r} cannot be loaded here ({reason}); pass --model with the "
            "base it was trained on"
        ) from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(
            f"{path}: not valid JSON ({str(err).splitlines()[0]}); the file is damaged, save the adapter again"
        ) from err


def _refuse_pickle_only(folder: Path, safe_name: str) -> None:
    """Loading is data only: a folder whose weights exist only as pickle files is refused, with the reason."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = [n for n in PICKLE_NAMES if (folder / n).is_file()]
    if pickles:
        raise AdapterError(
            f"{folder / pickles[0]}: refusing to load a pickle file (unpickling can run arbitrary code); loramoe "
            f"loads {safe_name} only. Convert it to safetensors where you trust its origin."
        )


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


def _load_peft(folder: Path, meta: dict, base: str | None, dtype: str):

    name = base or meta.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise AdapterError(
            f"{folder / 'adapter_config.json'}: the adapter does not name its base model; pass --model"
        )
    _refuse_pickle_only(folder, "adapter_model.safetensors")
    model, tokenizer = _load_named_base(name, base is None, folder / "adapter_config.json", dtype)

    def load():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)).eval()

    return _third_party_load(folder / "adapter_config.json", load), tokenizer
