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
- A special token of the tokenizer written out in a row's text (``<|im_end|>`` quoted in a completion) is read by
  TRL's tokenization as that token. The raw rows are checked before TRL prepares them, so a finding names the row
  and field as the user indexes them (``train_dataset[7]['completion']``), with the Trainer path's detection and
  modes (``loramoe.data.special_tokens``): warn (default), refuse, allow. A streamed dataset is not read ahead:
  its rows are checked as training reads them.
- Adapter parameters stay float32: TRL casts trainable parameters of a quantized model to bfloat16, which is
  undone here; a quantized base passes the Trainer's adapter check (``models.quantization.adapters_attached``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from loramoe.data.dataset import TaskTypeCollator
from loramoe.data.sources import SPECIAL_TOKENS_IN_TEXT
from loramoe.data.special_tokens import first_special_token, refusal, special_tokens_pattern, warning
from loramoe.errors import ConfigError, DataError
from loramoe.inject import adapted_modules, adapter_parameters, get_config
from loramoe.loss import compute_loss
from loramoe.models.quantization import adapters_attached, prepare_for_training
from loramoe.training.stats import RouterStatsCallback
from loramoe.training.trainer import GuardedTrainer, LoRAMoETrainer
from loramoe.validation import check_value, one_of

try:
    from datasets import IterableDataset
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import get_dataset_column_names
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("loramoe.training.trl needs TRL: pip install 'loramoe[trl]'") from err

logger = logging.getLogger("loramoe.data")

_SETTING = "pass special_tokens_in_text='{}'"  # how a TRL user changes what special tokens in the text do


class LoRAMoESFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for a model with LoRAMoE layers (``loramoe.inject``): the loss gains the LBC from each
    sample's task type, the logs gain the router statistics, and the output is a loramoe adapter.

    Args:
        model: a model already adapted with ``loramoe.inject`` (not a name, not a ``PeftModel``).
        args: an ``SFTConfig`` (or ``TrainingArguments``); ``remove_unused_columns`` is set to False.
        task_type_column: the dataset column holding each sample's task type (name or index).
        special_tokens_in_text: a row whose text holds a special token of the tokenizer written out (a completion
            quoting ``<|im_end|>``) is tokenised as that token, not as text: "warn" (count them per dataset in
            ``special_token_rows``, warn naming the first row), "refuse" (stop at the first, naming it) or "allow"
            (count them only).
        **kwargs: the other ``SFTTrainer`` arguments (``train_dataset``, ``processing_class``, ``callbacks``, ...).

    Raises:
        ConfigError: the model has no LoRAMoE layers, a ``peft_config`` or ``compute_loss_func`` is given, packing,
            padding-free batches or label smoothing are on, or the first training sample has no task type column.
        DataError: ``special_tokens_in_text="refuse"`` and a row holds a special token as text.
    """

    # The Trainer's rules, which read only Trainer attributes: the LBC's share of a step, adapter checkpoints.
    lbc_scale = GuardedTrainer.lbc_scale
    _save = LoRAMoETrainer._save
    _load_from_checkpoint = LoRAMoETrainer._load_from_checkpoint

    def __init__(
        self,
        model: Any,
        args: Any = None,
        *,
        task_type_column: str = "task_type",
        special_tokens_in_text: str = "warn",
        **kwargs: Any,
    ) -> None:
        check_value("special_tokens_in_text", special_tokens_in_text, one_of(SPECIAL_TOKENS_IN_TEXT))
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
        self.special_tokens_in_text = special_tokens_in_text
        self.special_token_rows: dict[str, int] = {}  # per dataset checked whole: rows with a special token
        prepare_for_training(model)
        with adapters_attached(model):
            super().__init__(model, args, **kwargs)
        for param in adapter_parameters(self.model).values():
            param.data = param.data.float()  # TRL casts a quantized model's trainable parameters to bfloat16
        self.args.remove_unused_columns = False  # read when the dataloaders are built: keep the task types
        self.data_collator = TaskTypeCollator(self.data_collator, cfg.task_names, task_type_column)
        self.router_stats = RouterStatsCallback(cfg.task_names, cfg.group_of_expert())
        self.callback_handler.callbacks.insert(0, self.router_stats)  # before the reporting callbacks

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if "input_ids" not in get_dataset_column_names(dataset):  # a tokenized dataset holds no text to read
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = self._check_special_tokens(
                dataset,
                special_tokens_pattern(tokenizer),
                args.dataset_text_field,
                formatting_func,
                dataset_name,
            )
        return super()._prepare_dataset(
            dataset, processing_class, args, packing, formatting_func, dataset_name
        )

    def _check_special_tokens(
        self,
        dataset: Any,
        pattern: re.Pattern | None,
        text_field: str,
        formatting_func: Callable | None,
        name: str,
    ) -> Any:
        """``dataset``, after counting (warn, allow) or refusing its rows holding a special token as text."""
        label = {"train": "train_dataset", "eval": "eval_dataset"}.get(name, f"eval_dataset[{name!r}]")
        mode = self.special_tokens_in_text

        def found_in(row: dict, index: int) -> tuple[str, str] | None:
            texts = _row_texts(row, f"{label}[{index}]", text_field, formatting_func)
            found = first_special_token(pattern, texts)
            if found and mode == "refuse":
                raise DataError(refusal(found[1], found[0], _SETTING))
            return found

        if pattern is None:
            return dataset
        if isinstance(dataset, IterableDataset):  # streamed: read once, as training reads it
            warned = []

            def check_row(row: dict, index: int) -> dict:
                found = found_in(row, index)
                if found and mode == "warn" and not warned:
                    warned.append(found)
                    first = f"{found[1]} {found[0]!r}"
                    logger.warning(
                        "LoRAMoESFTTrainer: %s", warning(f"rows of the streamed {label}", first, _SETTING)
                    )
                return row

            return dataset.map(check_row, with_indices=True)
        read = ("prompt", "completion", "messages", "conversations", text_field)
        rows = (
            dataset
            if formatting_func
            else dataset.select_columns([c for c in dataset.column_names if c in read])
        )
        hits = [(i, found) for i, row in enumerate(rows) if (found := found_in(row, i))]
        self.special_token_rows[label] = len(hits)
        if hits and mode == "warn":
            (_, (token, where)) = hits[0]
            message = warning(f"{len(hits)} rows of {label}", f"{where} {token!r}", _SETTING)
            logger.warning("LoRAMoESFTTrainer: %s", message)
        return dataset

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


def _row_texts(
    row: dict, at: str, text_field: str, formatting_func: Callable | None
) -> Iterator[tuple[str, str]]:
    """``(where, text)`` of each text of ``row`` that TRL tokenises (``at`` names the row): the formatting
    function's text, or the prompt and completion, or the messages, or the text field."""
    if formatting_func is not None:
        text = formatting_func(row)
        if isinstance(text, str):
            yield f"formatting_func({at})", text
        return
    keys = ("prompt", "completion") if "prompt" in row else ("messages", "conversations", text_field)
    for key in keys:
        yield from _field_texts(row.get(key), f"{at}[{key!r}]")


def _field_texts(value: Any, at: str) -> Iterator[tuple[str, str]]:
    """The texts of one field: a string, or messages whose content is a string or a list of text parts."""
    if isinstance(value, str):
        yield at, value
        return
    for j, message in enumerate(value if isinstance(value, list) else ()):
        if not isinstance(message, dict):
            continue
        key = "content" if "content" in message else "value"  # "value": the from/value conversation format
        content = message.get(key)
        if isinstance(content, str):
            yield f"{at}[{j}][{key!r}]", content
        for n, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield f"{at}[{j}][{key!r}][{n}]['text']", part["text"]
