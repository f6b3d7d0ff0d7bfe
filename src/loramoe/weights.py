"""The one gate every weight file loramoe reads goes through: safetensors only, pickle-format weights refused.

Unpickling a file can run any code it carries, so loramoe reads model and adapter weights from safetensors files
only. Each loader (loramoe adapters, PEFT adapters, base models, full fine-tuning outputs) asks ``weights_format``
which format to read before it reads anything:

- the safetensors file the loader reads is present: read it, and tell the third-party loader to read nothing else
  (``use_safetensors=True`` for transformers), so a pickle beside it is never opened;
- only pickle-format weights (``pytorch_model.bin``, ``adapter_model.bin``, shards of them, ``*.pt``...) are there:
  refused with an error naming the file and the reason, unless the user opted in (``allow_pickle``, the
  ``--allow-pickle`` flag, ``allow_pickle: true`` in a run config); then transformers and PEFT read them with
  ``torch.load(weights_only=True)``, which rebuilds tensors only and refuses other objects.

Files a loader never reads as weights (``training_args.bin`` beside a full fine-tuning output) are not weights and
not looked at. The Trainer's own checkpoint state (optimizer, scheduler, RNG) is loaded by transformers with
``weights_only=True``, and only from a checkpoint whose completion marker this run wrote and verified.
"""

from __future__ import annotations

import re
from pathlib import Path

from loramoe.errors import AdapterError, LoRAMoEError

# Weight files in a pickle format that transformers or PEFT would read (whole or sharded), and loose ``.pt``-style
# files a user may hand us as weights.
_PICKLE_WEIGHTS = re.compile(
    r"^(pytorch_model|adapter_model|model)([-.][\w.-]*)?\.(bin|pt|pth|ckpt|pkl)(\.index\.json)?$"
    r"|^[\w.-]+\.(pt|pth|ckpt|pkl|pickle)$"
)
SAFETENSORS = "safetensors"
PICKLE = "pickle"


def pickle_weight_files(folder: str | Path) -> list[Path]:
    """The pickle-format weight files in ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PICKLE_WEIGHTS.match(p.name) and p.is_file())


def weights_format(
    folder: str | Path,
    safetensors_names: tuple[str, ...],
    *,
    allow_pickle: bool = False,
    what: str = "weights",
    error: type[LoRAMoEError] = AdapterError,
) -> str | None:
    """Which format a loader may read from ``folder``: ``"safetensors"``, ``"pickle"`` (opted in), or None (no
    weights of either kind: the loader reports what is missing).

    Args:
        folder: the directory the loader reads.
        safetensors_names: the safetensors files (or index) the loader reads, any one of which is enough.
        allow_pickle: the user's explicit opt-in to read pickle-format weights (then with ``weights_only=True``).
        what: what the weights are, for the message (``"adapter"``, ``"model"``).
        error: the error type to raise.

    Raises:
        error: only pickle-format weights are there and ``allow_pickle`` is off; the message names the file.
    """
    folder = Path(folder)
    if any((folder / name).is_file() for name in safetensors_names):
        return SAFETENSORS
    pickles = pickle_weight_files(folder)
    if not pickles:
        return None
    if not allow_pickle:
        raise error(
            f"{pickles[0]}: refusing to load a pickle file (unpickling can run arbitrary code): these {what} "
            f"weights are in pickle format, and loramoe reads {' or '.join(safetensors_names)}. Convert the file to safetensors where you trust its "
            "origin, or pass --allow-pickle (allow_pickle: true) to read it with torch.load(weights_only=True)"
        )
    return PICKLE
