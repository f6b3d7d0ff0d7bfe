"""Quantized bases through bitsandbytes: 4-bit NF4 (QLoRA's format) or 8-bit LLM.int8 linears under LoRAMoE.

Design decisions:
- transformers loads the quantized linears (``BitsAndBytesConfig``); LoRAMoE wraps them and calls their forward like
  any linear (``loramoe.layer``), so the method needs nothing of this module and its experts and routers stay
  float32 on top of the 4- or 8-bit weights.
- 4-bit is NF4 with double quantization (QLoRA's setting); its matmuls compute in the run's ``dtype`` (float32 on
  the CPU, bfloat16 on a GPU). LLM.int8 computes in float16 whatever the dtype: bitsandbytes' own choice.
- For training, the modules left unquantized (embeddings, norms, the output layer) are cast to float32 when they
  were loaded in half precision, as PEFT's ``prepare_model_for_kbit_training`` does, so the norms and the loss are
  computed in float32. The input gradients gradient checkpointing needs are enabled by transformers' own
  ``gradient_checkpointing_enable`` (which the Trainer calls).
- transformers' Trainer refuses a quantized model unless PEFT adapters are attached; LoRAMoE layers are attached
  adapters, so ``adapters_attached`` tells it so while a Trainer is built (a private flag, held for that moment
  only; ``tests/unit/test_quantization.py`` checks the stock Trainer still refuses without it).
- bitsandbytes is optional (``pip install 'loramoe[quant]'``) and imported only when a quantized base is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from loramoe.errors import ConfigError
from loramoe.inject import adapted_modules

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("4bit", "8bit")
_HALF = (torch.float16, torch.bfloat16)


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` of ``quantization`` (``"4bit"`` or ``"8bit"``).

    Raises:
        ConfigError: an unknown quantization, or bitsandbytes is not installed (the message names the extra).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)} or none, got {quantization!r}"
        )
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it to build the quantized linears)
    except ImportError as err:
        raise ConfigError(
            f"a {quantization} base needs bitsandbytes: pip install 'loramoe[quant]' (or load the base unquantized)"
        ) from err
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` with quantized (4- or 8-bit) linears."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Cast the unquantized half-precision parameters of a quantized ``model`` to float32, in place (PEFT's rule:
    norms, embeddings and the output layer; the 4- and 8-bit weights are left as they are). A model that is not
    quantized is returned unchanged."""
    if not is_quantized(model):
        return model
    for param in model.parameters():
        if param.dtype in _HALF and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    return model


# transformers.trainer_utils.validate_quantization_for_training reads it: "PEFT adapters are attached".
_ADAPTERS_FLAG = "_hf_peft_config_loaded"


@contextmanager
def adapters_attached(model: nn.Module | None) -> Iterator[None]:
    """Inside the block a quantized ``model`` with LoRAMoE layers passes the Trainer's check that a quantized model
    has trainable adapters (build the Trainer in it); the flag is gone on exit, so nothing else reads it. Any other
    model is left alone."""
    if (
        model is None
        or not is_quantized(model)
        or not adapted_modules(model)
        or getattr(model, _ADAPTERS_FLAG, False)
    ):
        yield
        return
    model.__dict__[_ADAPTERS_FLAG] = True  # shadows transformers' class default (False) until the block ends
    try:
        yield
    finally:
        del model.__dict__[_ADAPTERS_FLAG]
