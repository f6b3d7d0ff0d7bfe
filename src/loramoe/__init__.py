"""loramoe: LoRAMoE (arXiv 2312.09979) for Hugging Face causal language models.

LoRA experts with a router in the feed-forward layers of a frozen model, trained with the localized balancing
constraint, so that fine-tuning learns downstream tasks without erasing the world knowledge the model has.
"""

from __future__ import annotations

from loramoe._version import __version__
from loramoe.adapter import load_adapter, save_adapter
from loramoe.config import FFN_TARGETS, LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, DataError, LoRAMoEError, TargetError, TrainingError
from loramoe.inject import adapted_modules, disable_adapters, disable_experts, inject, summary
from loramoe.layer import LoRAMoELinear
from loramoe.loss import LossParts, compute_loss, localized_balancing_loss
from loramoe.routing import RouterRecorder

__all__ = [
    "FFN_TARGETS",
    "AdapterError",
    "ConfigError",
    "DataError",
    "LoRAMoEConfig",
    "LoRAMoEError",
    "LoRAMoELinear",
    "LossParts",
    "RouterRecorder",
    "TargetError",
    "TrainingError",
    "__version__",
    "adapted_modules",
    "compute_loss",
    "disable_adapters",
    "disable_experts",
    "inject",
    "load_adapter",
    "localized_balancing_loss",
    "save_adapter",
    "summary",
]
