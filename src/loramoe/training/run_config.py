"""RunConfig: one training run as written in the YAML file (model, method, adapter, data, TrainingArguments).

Design decisions:
- Every section is validated when the config is built, before any model is loaded, with the rules every config
  shares (``loramoe.validation``): unknown keys are listed with the valid ones.
- ``training`` is passed to ``transformers.TrainingArguments`` by its own names. transformers checks choices and
  combinations itself (its message is passed on, naming the setting it rejected), but accepts a wrong type or an
  out-of-range number and fails much later, after the model is loaded; those two checks are done here.
- ``training_arguments()`` forces what LoRAMoE needs (task types must reach the loss; non-reentrant gradient
  checkpointing so the router probabilities keep their gradient).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramoe.config import LoRAMoEConfig
from loramoe.data.sources import DataConfig
from loramoe.errors import ConfigError
from loramoe.models.base import DTYPES
from loramoe.models.bundled import DEFAULT_MODEL
from loramoe.models.quantization import QUANTIZATIONS
from loramoe.validation import (
    PATH_NEED,
    Rule,
    boolean,
    check_fields,
    check_value,
    from_mapping,
    integer,
    is_int,
    is_path_text,
    number,
    one_of,
    optional,
    require,
    section,
    shown,
)

if TYPE_CHECKING:  # transformers' training module imports peft and more: seconds the CLI's help need not pay
    from transformers import TrainingArguments

METHODS = ("loramoe", "lora", "full")
RUN_CONFIG_NAME = "loramoe_run.json"

# loramoe's defaults for TrainingArguments the run config does not set.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 50,
    "logging_steps": 5,
    "seed": 42,
}


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
        check_fields(
            self,
            {
                "rank": optional(integer(1)),
                "alpha": optional(number(0, low_open=True)),
                "dropout": optional(number(0, 1, high_open=True)),
            },
        )


@dataclass
class RunConfig:
    """One training run, as written in the YAML file.

    Attributes:
        model: base model: ``smollm2-135m-instruct`` (bundled, offline), a local HF directory or a hub name.
        method: ``loramoe``, ``lora`` (PEFT baseline) or ``full`` (full fine-tuning).
        dtype: ``float32`` (default; use it on CPU), ``bfloat16``, ``float16`` or ``auto``; with ``quantization``,
            the dtype the 4-bit matmuls compute in.
        quantization: ``4bit`` (NF4, QLoRA's format) or ``8bit`` (LLM.int8) base linears through bitsandbytes
            (``pip install 'loramoe[quant]'``), under float32 experts and routers; null (default): unquantized.
            Not with ``method: full``.
        loramoe: the LoRAMoE adapter and LBC (``LoRAMoEConfig`` fields).
        lora: the LoRA baseline (``rank``, ``alpha``, ``dropout``).
        data: data sources and tokenisation (``DataConfig`` fields); required.
        training: ``transformers.TrainingArguments`` by their own names (``output_dir``, ``learning_rate``, ...).
        allow_pickle: read a base model whose weights exist only in pickle format (``pytorch_model.bin``), through
            ``torch.load(weights_only=True)``. Off by default: such a model is refused, because unpickling a file
            can run code it carries. Turn it on only for a model whose origin you trust.
    """

    model: str = DEFAULT_MODEL
    method: str = "loramoe"
    dtype: str = "float32"
    quantization: str | None = None
    loramoe: LoRAMoEConfig = field(default_factory=LoRAMoEConfig)
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    data: DataConfig | None = None  # required: None only until __post_init__ reports it missing
    training: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "method": one_of(METHODS),
                "model": (is_path_text, f"a model name or path {PATH_NEED}, e.g. {DEFAULT_MODEL}"),
                "dtype": one_of(DTYPES),
                "quantization": optional(one_of(QUANTIZATIONS)),
                "allow_pickle": boolean(),
            },
        )
        require(
            self.quantization is None or self.method != "full",
            f"quantization {self.quantization!r} with method 'full': a quantized base cannot be fully fine-tuned; "
            "use method loramoe or lora, or quantization: null",
        )
        self.loramoe = section("loramoe", LoRAMoEConfig, self.loramoe)
        self.lora = section("lora", LoraBaselineConfig, self.lora)
        require(
            self.data is not None, "data is missing: give data.sources, a list of {path: ..., task_type: ...}"
        )
        self.data = section("data", DataConfig, self.data)
        require(
            isinstance(self.training, dict), "training must be a mapping of TrainingArguments names to values"
        )
        out = self.training.get("output_dir")
        require(bool(out), "training.output_dir is missing: where should the adapter and checkpoints go?")
        require(
            isinstance(out, (str, os.PathLike)), f"training.output_dir must be a directory path, got {out!r}"
        )
        require(
            is_path_text(os.fspath(out)),
            f"training.output_dir must be a directory path {PATH_NEED}, got {shown(os.fspath(out))}",
        )
        require(
            not Path(out).exists() or Path(out).is_dir(),
            f"training.output_dir {str(out)!r} is a file; give a directory (it is created)",
        )
        self.training_arguments()  # validate names and values now, not after the model is loaded

    def training_arguments(self) -> TrainingArguments:
        """The ``TrainingArguments``, with the settings LoRAMoE needs forced (task_types must reach the loss).

        Raises:
            ConfigError: an unknown name, a value of the wrong type or range, or a value transformers rejects;
                the message names the ``training.`` setting.
        """
        from transformers import TrainingArguments

        kwargs = {**TRAINING_DEFAULTS, **self.training, **self._forced_settings()}
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(TrainingArguments)})
        require(
            not unknown, f"unknown training argument(s) {unknown}; use transformers.TrainingArguments names"
        )
        for key in self.training:
            check_value(f"training.{key}", kwargs[key], _training_rule(key))
        try:
            args = TrainingArguments(**kwargs)
        except (ValueError, TypeError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            key = self._rejected_setting(kwargs)
            raise ConfigError(f"training{'.' + key if key else ''}: {reason}") from err
        _check_trainer_needs(args, self)
        return args

    def _forced_settings(self) -> dict[str, Any]:
        """What LoRAMoE needs whatever the config says, and defaults that depend on the rest of the run."""
        import torch

        given = self.training
        forced: dict[str, Any] = {"remove_unused_columns": False, "label_names": ["labels"]}
        for key in ("save_strategy", "eval_strategy", "logging_strategy"):
            if given.get(key) is False:  # YAML 1.1 reads an unquoted `no` as false
                forced[key] = "no"
        if given.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in given:
            # Reentrant checkpointing runs the forward under no_grad, which would hide the router probabilities
            # from the LBC's gradient.
            forced["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if "dataloader_pin_memory" not in given:
            # Pinned memory only helps a copy to an accelerator (and warns on every dataloader without one).
            forced["dataloader_pin_memory"] = not given.get("use_cpu") and torch.cuda.is_available()
        if "ddp_find_unused_parameters" not in given:
            # Dense routing uses every adapter parameter each step; top-k may leave an expert without tokens.
            forced["ddp_find_unused_parameters"] = self.method == "loramoe" and self.loramoe.top_k is not None
        return forced

    def _rejected_setting(self, kwargs: dict[str, Any]) -> str | None:
        """The ``training`` setting TrainingArguments rejects on its own: each is tried alone on loramoe's
        defaults. None when only a combination fails (the message then names the settings itself)."""
        from transformers import TrainingArguments

        base = {k: v for k, v in kwargs.items() if k not in self.training or k == "output_dir"}
        for key in self.training:
            try:
                TrainingArguments(**{**base, key: kwargs[key]})
            except (ValueError, TypeError):
                return key
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return from_mapping(cls, data, where="config")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "loramoe": self.loramoe.to_dict(),
            "lora": dataclasses.asdict(self.lora),
            "data": self.data.to_dict(),
            "training": dict(self.training),
            "allow_pickle": self.allow_pickle,
        }


# TrainingArguments fields whose out-of-range values transformers accepts and then fails on (or ignores) later.
_TRAINING_RANGES: dict[str, Rule] = {
    "learning_rate": number(0),
    "num_train_epochs": number(0, low_open=True),
    "per_device_train_batch_size": integer(1),
    "per_device_eval_batch_size": integer(1),
    "gradient_accumulation_steps": integer(1),
    "save_steps": (number(0, low_open=True)[0], "> 0 (a fraction < 1 is a share of the total steps)"),
    "logging_steps": (number(0, low_open=True)[0], "> 0 (a fraction < 1 is a share of the total steps)"),
    "eval_steps": optional(number(0, low_open=True)),
    "warmup_steps": number(0),
    "weight_decay": number(0),
    "max_grad_norm": (number(0)[0], ">= 0 (0 disables clipping)"),
    "adam_beta1": number(0, 1, high_open=True),
    "adam_beta2": number(0, 1, high_open=True),
    "adam_epsilon": number(0, low_open=True),
    "label_smoothing_factor": number(0, 1, high_open=True),
    "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data_seed": (lambda v: v is None or (is_int(v) and 0 <= v < 2**32), "an integer in [0, 2**32) or null"),
    "dataloader_num_workers": integer(0),
    "save_total_limit": optional(integer(1)),
}
_KIND_RULES: dict[type, Rule] = {
    bool: boolean(),
    int: integer(),
    float: number(),
    str: ((lambda v: isinstance(v, str)), "a string"),
}


def _check_trainer_needs(args: TrainingArguments, run: RunConfig) -> None:
    """What the Trainer needs only once training starts, checked now: the optimizer and its package, the
    scheduler with its kwargs, the report_to integrations' packages, and validation data for evaluation."""
    import torch
    from transformers import Trainer, get_scheduler
    from transformers.integrations import get_reporting_integration_callbacks

    def fail(key: str, err: BaseException) -> None:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"training.{key}: {reason}") from err

    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError, TypeError, RuntimeError) as err:
        fail("optim", err)
    try:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        get_scheduler(
            args.lr_scheduler_type,
            optimizer=probe,
            num_warmup_steps=args.get_warmup_steps(100),
            num_training_steps=100,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except (ValueError, TypeError, KeyError, ImportError) as err:
        fail("lr_scheduler_kwargs" if args.lr_scheduler_kwargs else "lr_scheduler_type", err)
    try:
        for callback in get_reporting_integration_callbacks(args.report_to):
            callback()  # each one raises when its package is missing
    except (ImportError, ValueError, RuntimeError) as err:
        fail("report_to", err)
    evaluates = str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
    if (evaluates or args.load_best_model_at_end) and not run.data.val_size:
        raise ConfigError(
            f"training.eval_strategy is {str(getattr(args.eval_strategy, 'value', args.eval_strategy))!r}"
            f"{' (load_best_model_at_end)' if args.load_best_model_at_end else ''} but there is no validation "
            "data: set data.val_size (a count, or a fraction such as 0.1), or eval_strategy: 'no'"
        )


@functools.cache
def _training_rule(key: str) -> Rule:
    """The rule a ``training`` value must pass: its range if known, else its plain kind from the type hint (bool,
    int, float, str, one of them, or null); anything else is left to transformers."""
    if key in _TRAINING_RANGES:
        return _TRAINING_RANGES[key]
    from transformers import TrainingArguments

    hint = typing.get_type_hints(TrainingArguments).get(key)
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    kinds = typing.get_args(hint) if union else (hint,)
    nullable = type(None) in kinds
    kinds = tuple(k for k in kinds if k is not type(None))
    if not kinds or not all(k in _KIND_RULES for k in kinds):
        return (lambda v: True), "anything"
    rules = [_KIND_RULES[k] for k in kinds]
    need = " or ".join(need for _, need in rules) + (" or null" if nullable else "")
    return (lambda v: (v is None and nullable) or any(ok(v) for ok, _ in rules)), need
