"""RunConfig: one training run as written in the YAML file (model, method, adapter, data, TrainingArguments).

Design decisions:
- Every section is validated when the config is built, before any model is loaded: unknown keys are listed with
  the valid ones, and values of plain types and known ranges in ``training`` are checked here because
  transformers accepts many wrong ones and fails far later.
- ``training_arguments()`` forces what LoRAMoE needs (task types must reach the loss; non-reentrant gradient
  checkpointing so the router probabilities keep their gradient).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from transformers import TrainingArguments

from loramoe.config import LoRAMoEConfig
from loramoe.errors import ConfigError
from loramoe.validation import is_int, is_number

METHODS = ("loramoe", "lora", "full")
RUN_CONFIG_NAME = "loramoe_run.json"


@dataclass
class LoraBaselineConfig:
    """Plain LoRA (through PEFT) on the same targets as LoRAMoE.

    Attributes:
        rank: LoRA rank; None matches LoRAMoE's trainable-parameter budget on the same targets.
        alpha: LoRA alpha; None keeps LoRAMoE's ``alpha / rank`` scaling.
        dropout: LoRA dropout; None uses LoRAMoE's.
    """

    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "rank": (is_int(self.rank) and self.rank >= 1, "an integer >= 1 or null"),
            "alpha": (is_number(self.alpha) and self.alpha > 0, "a positive number or null"),
            "dropout": (is_number(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1) or null"),
        }
        for name, (ok, need) in checks.items():
            if getattr(self, name) is not None and not ok:
                raise ConfigError(f"{name} must be {need}, got {getattr(self, name)!r}")


@dataclass
class RunConfig:
    """One training run, as written in the YAML file.

    Attributes:
        model: base model: ``smollm2-135m-instruct`` (bundled, offline), a local HF directory or a hub name.
        method: ``loramoe``, ``lora`` (PEFT baseline) or ``full`` (full fine-tuning).
        dtype: ``float32`` (default; use it on CPU), ``bfloat16``, ``float16`` or ``auto``.
        loramoe: the LoRAMoE adapter and LBC (``LoRAMoEConfig`` fields).
        lora: the LoRA baseline (``rank``, ``alpha``, ``dropout``).
        data: data sources and tokenisation (``DataConfig`` fields).
        training: ``transformers.TrainingArguments`` by their own names (``output_dir``, ``learning_rate``, ...).
    """

    model: str = "smollm2-135m-instruct"
    method: str = "loramoe"
    dtype: str = "float32"
    loramoe: LoRAMoEConfig = field(default_factory=LoRAMoEConfig)
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    data: Any = None  # loramoe.data.DataConfig
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from loramoe.data.sources import DataConfig

        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a model name or path, e.g. smollm2-135m-instruct")
        from loramoe.models.base import DTYPES

        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.loramoe, LoRAMoEConfig):
            self.loramoe = _sub("loramoe", LoRAMoEConfig.from_dict, self.loramoe)
        if not isinstance(self.lora, LoraBaselineConfig):
            self.lora = _sub("lora", lambda d: _dataclass_from_dict(LoraBaselineConfig, d, "lora"), self.lora)
        if self.data is None:
            raise ConfigError("data is missing: give data.sources, a list of {path: ..., task_type: ...}")
        if not isinstance(self.data, DataConfig):
            self.data = _sub("data", DataConfig.from_dict, self.data)
        if not isinstance(self.training, dict):
            raise ConfigError("training must be a mapping of TrainingArguments names to values")
        if not self.training.get("output_dir"):
            raise ConfigError("training.output_dir is missing: where should the adapter and checkpoints go?")
        out = self.training["output_dir"]
        if not isinstance(out, (str, os.PathLike)):
            raise ConfigError(f"training.output_dir must be a directory path, got {out!r}")
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"training.output_dir {str(out)!r} is a file; give a directory (it is created)")
        self.training_arguments()  # validate names and values now, not after the model is loaded

    def training_arguments(self) -> TrainingArguments:
        """The ``TrainingArguments``, with the settings LoRAMoE needs forced (task_types must reach the loss)."""
        kwargs = {
            "report_to": "none",
            "save_strategy": "steps",
            "save_steps": 50,
            "logging_steps": 5,
            "seed": 42,
        }
        kwargs.update(self.training)
        for key in ("save_strategy", "eval_strategy", "logging_strategy"):
            if kwargs.get(key) is False:  # YAML 1.1 reads an unquoted `no` as false
                kwargs[key] = "no"
        kwargs["remove_unused_columns"] = False
        kwargs["label_names"] = ["labels"]
        if kwargs.get("gradient_checkpointing"):
            # Reentrant checkpointing runs the forward under no_grad, which would hide the router probabilities
            # from the LBC's gradient.
            kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        # Pinned memory only helps a copy to an accelerator (and warns on every dataloader without one).
        import torch

        kwargs.setdefault("dataloader_pin_memory", not kwargs.get("use_cpu") and torch.cuda.is_available())
        # Dense routing uses every adapter parameter each step; top-k may leave an expert without tokens.
        kwargs.setdefault(
            "ddp_find_unused_parameters", self.method == "loramoe" and self.loramoe.top_k is not None
        )
        valid = {f.name for f in dataclasses.fields(TrainingArguments)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ConfigError(
                f"unknown training argument(s) {unknown}; use transformers.TrainingArguments names"
            )
        for key in self.training:
            _check_training_value(key, kwargs[key])
        try:
            return TrainingArguments(**kwargs)
        except (ValueError, TypeError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            named = [
                k
                for k, v in self.training.items()
                if isinstance(v, str) and re.search(rf"\b{re.escape(v)}\b", reason)
            ]
            culprit = max(
                named, key=lambda k: len(self.training[k]), default=None
            )  # the value the message quotes
            raise ConfigError(f"training{'.' + culprit if culprit else ''}: {reason}") from err

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _dataclass_from_dict(cls, data, "config")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "dtype": self.dtype,
            "loramoe": self.loramoe.to_dict(),
            "lora": dataclasses.asdict(self.lora),
            "data": self.data.to_dict(),
            "training": dict(self.training),
        }


# TrainingArguments fields whose out-of-range values transformers accepts and then fails on (or ignores) later.
_TRAINING_RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "save_steps": (lambda v: v > 0, "> 0 (a fraction < 1 is a share of the total steps)"),
    "logging_steps": (lambda v: v > 0, "> 0 (a fraction < 1 is a share of the total steps)"),
    "eval_steps": (lambda v: v is None or v > 0, "> 0 or null"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "data_seed": (lambda v: v is None or 0 <= v < 2**32, "in [0, 2**32) or null"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
    "save_total_limit": (lambda v: v is None or v >= 1, ">= 1 or null"),
}
_SIMPLE_TYPES: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (is_int, "an integer"),
    float: (is_number, "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


@functools.cache
def _training_hints() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(TrainingArguments)


def _check_training_value(key: str, value: Any) -> None:
    """Check a ``TrainingArguments`` value of a plain type (bool, int, float, str, or one of them or null) and the
    ranges in ``_TRAINING_RANGES``; transformers itself checks neither, and fails far later on a wrong one."""
    import types
    import typing

    hint = _training_hints().get(key)
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is Union
        else (hint,)
    )
    nullable = type(None) in options
    simple = [t for t in options if t is not type(None)]
    plain = simple and all(t in _SIMPLE_TYPES for t in simple) and not (value is None and nullable)
    if plain and not any(_SIMPLE_TYPES[t][0](value) for t in simple):
        need = " or ".join(_SIMPLE_TYPES[t][1] for t in simple) + (" or null" if nullable else "")
        raise ConfigError(f"training.{key} must be {need}, got {value!r}")
    rule = _TRAINING_RANGES.get(key)
    if rule is not None and value is not None:
        ok, need = rule
        if not is_number(value) or not ok(value):
            raise ConfigError(f"training.{key} must be {need}, got {value!r}")


def _dataclass_from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def _sub(name: str, build, value):
    try:
        return build(value)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from err
