"""LoRAMoE in a TRL ``SFTTrainer`` pipeline: ``LoRAMoESFTTrainer`` is ``trl.SFTTrainer`` with the LBC.

A PEFT LoRA pipeline changes in two places::

    model = inject(model, LoRAMoEConfig(num_experts=6, rank=4))     # instead of peft_config=LoraConfig(...)
    trainer = LoRAMoESFTTrainer(model=model, args=SFTConfig(...), train_dataset=data, processing_class=tokenizer)

and the dataset gains a ``task_type`` column (a task name such as ``knowledge`` / ``downstream``, or its index).

Design decisions:
- The subclass is what TRL asks for (its ``compute_loss_func`` is deprecated in favour of overriding
  ``compute_loss``). The LM term is TRL's own ``compute_loss`` (fused LM head, ``loss_type``, its token metrics);
  ``loramoe.compute_loss`` records the routers around it and adds the LBC, scaled as ``LoRAMoETrainer`` scales it,
  so both trainers give the same loss on the same batch (``tests/unit/test_trl.py``).
- Task types reach the loss through the collator (``TaskTypeCollator`` around the one TRL builds), never the layers;
  ``remove_unused_columns`` is turned off so the Trainer keeps the column. Packing and padding-free batches join
  samples into one row, which leaves no per-sample type, so they are refused, as are a ``compute_loss_func`` and
  label smoothing (their extra forward pass would be recorded too).
- Router statistics reach TRL's logs through ``RouterStatsCallback``, first among the callbacks; checkpoints and the
  final output are loramoe adapters (``LoRAMoETrainer``'s saving and resuming) with loramoe's model card.
- Adapter parameters stay float32: TRL casts trainable parameters of a quantized model to bfloat16, which is
  undone here; a quantized base passes the Trainer's adapter check (``models.quantization.adapters_attached``).
"""

from __future__ import annotations

from typing import Any

import torch

from loramoe.data.dataset import TaskTypeCollator
from loramoe.errors import ConfigError
from loramoe.inject import adapted_modules, adapter_parameters, get_config
from loramoe.loss import compute_loss
from loramoe.models.quantization import adapters_attached, prepare_for_training
from loramoe.training.stats import RouterStatsCallback
from loramoe.training.trainer import GuardedTrainer, LoRAMoETrainer

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("loramoe.training.trl needs TRL: pip install 'loramoe[trl]'") from err


class LoRAMoESFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for a model with LoRAMoE layers (``loramoe.inject``): the loss gains the LBC from each
    sample's task type, the logs gain the router statistics, and the output is a loramoe adapter.

    Args:
        model: a model already adapted with ``loramoe.inject`` (not a name, not a ``PeftModel``).
        args: an ``SFTConfig`` (or ``TrainingArguments``); ``remove_unused_columns`` is set to False.
        task_type_column: the dataset column holding each sample's task type (name or index).
        **kwargs: the other ``SFTTrainer`` arguments (``train_dataset``, ``processing_class``, ``callbacks``, ...).

    Raises:
        ConfigError: the model has no LoRAMoE layers, a ``peft_config`` or ``compute_loss_func`` is given, packing,
            padding-free batches or label smoothing are on, or the first training sample has no task type column.
    """

    # The Trainer's rules, which read only Trainer attributes: the LBC's share of a step, adapter checkpoints.
    lbc_scale = GuardedTrainer.lbc_scale
    _save = LoRAMoETrainer._save
    _load_from_checkpoint = LoRAMoETrainer._load_from_checkpoint

    def __init__(
        self, model: Any, args: Any = None, *, task_type_column: str = "task_type", **kwargs: Any
    ) -> None:
        if isinstance(model, str) or not adapted_modules(model):
            raise ConfigError(
                "LoRAMoESFTTrainer needs a model with LoRAMoE layers: load it, then loramoe.inject(model, "
                "LoRAMoEConfig(...)) and pass the model object"
            )
        for name in ("peft_config", "compute_loss_func"):
            if kwargs.get(name) is not None:
                raise ConfigError(
                    f"LoRAMoESFTTrainer: drop {name}; the LoRAMoE layers and the LBC take its place"
                )
        args = _checked_args(args, model)
        cfg = get_config(model)
        _check_column(kwargs.get("train_dataset"), task_type_column)
        prepare_for_training(model)
        with adapters_attached(model):
            super().__init__(model, args, **kwargs)
        for param in adapter_parameters(self.model).values():
            param.data = param.data.float()  # TRL casts a quantized model's trainable parameters to bfloat16
        self.args.remove_unused_columns = False  # read when the dataloaders are built: keep the task types
        self.data_collator = TaskTypeCollator(self.data_collator, cfg.task_names, task_type_column)
        self.router_stats = RouterStatsCallback(cfg.task_names, cfg.group_of_expert())
        self.callback_handler.callbacks.insert(0, self.router_stats)  # before the reporting callbacks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sft_loss = super().compute_loss

        def sft_lm(batch: dict) -> tuple[torch.Tensor, None]:
            return sft_loss(model, batch, num_items_in_batch=num_items_in_batch), None

        scale = self.lbc_scale(model, num_items_in_batch)
        parts = compute_loss(
            model,
            dict(inputs),
            record=model.training,
            forward=sft_lm,
            lbc_scale=scale,
        )
        if model.training:
            self.router_stats.add_parts(parts, inputs, step_share=scale)
        if not return_outputs:
            return parts.total
        with torch.no_grad():  # the logits evaluation asks for, outside the recorded forward
            outputs = model(**{k: v for k, v in inputs.items() if k not in ("labels", "task_types")})
        return parts.total, outputs

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the adapter's card is loramoe's (``save_adapter`` writes it), which a TRL card would block."""


def _checked_args(args: Any, model: Any) -> Any:
    """``args`` (an ``SFTConfig`` by default), after refusing what leaves no per-sample task type or records a
    second forward."""
    if args is None:
        name = str(getattr(model, "name_or_path", "") or "model").rstrip("/").split("/")[-1]
        args = SFTConfig(f"{name}-LoRAMoE-SFT")
    refused = {
        "packing": "packing joins samples into one row, which leaves no per-sample task type for the LBC",
        "padding_free": "padding-free batches join samples into one row, leaving no per-sample task type",
        "label_smoothing_factor": "label smoothing runs a second forward pass that the LBC would count too",
    }
    for name, why in refused.items():
        if getattr(args, name, None):
            raise ConfigError(f"LoRAMoESFTTrainer: set {name} off; {why}")
    return args


def _check_column(dataset: Any, column: str) -> None:
    if dataset is None:
        return
    first = next(iter(dataset))
    if column not in first:
        raise ConfigError(
            f"the training data has no {column!r} column (columns: {sorted(first)}); add each sample's task type "
            "(e.g. 'knowledge' or 'downstream') or pass task_type_column="
        )
