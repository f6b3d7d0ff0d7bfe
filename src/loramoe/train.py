"""Training: the run config, the Trainer subclass (loss only), the baselines, checkpoints that survive crashes.

Design decisions:
- ``LoRAMoETrainer`` changes only how the loss is computed (``loramoe.compute_loss``), how the adapter is saved
  (adapter files instead of the whole model) and loaded on resume; everything else is the stock ``Trainer``, so
  ``report_to``, DDP under ``torchrun`` / ``accelerate launch``, bf16 and gradient checkpointing work as users expect.
- The same tool trains the baselines every user compares against: ``lora`` (PEFT, same targets, rank matched to
  LoRAMoE's trainable budget) and ``full`` fine-tuning. Task types are ignored by both.
- A checkpoint counts only once a ``loramoe_complete.json`` marker with the checksum of every file in it has been
  written (atomically, last); a resume takes the newest checkpoint whose marker verifies and says which torn ones
  it skipped.
- A NaN or infinite loss stops the run before the optimiser step, naming the step; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from loramoe.adapter import load_adapter_weights, save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, LoRAMoEError, TrainingError
from loramoe.files import atomic_write_text, sha256_file
from loramoe.inject import CONFIG_ATTR, get_config, inject, resolve_targets, summary
from loramoe.layer import linear_features
from loramoe.loss import compute_loss
from loramoe.routing import routing_stats

logger = logging.getLogger("loramoe.train")

METHODS = ("loramoe", "lora", "full")
COMPLETE_MARKER = "loramoe_complete.json"
RUN_CONFIG_NAME = "loramoe_run.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
            "rank": (_is_int(self.rank) and self.rank >= 1, "an integer >= 1 or null"),
            "alpha": (_is_number(self.alpha) and self.alpha > 0, "a positive number or null"),
            "dropout": (_is_number(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1) or null"),
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
        from loramoe.data import DataConfig

        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a model name or path, e.g. smollm2-135m-instruct")
        from loramoe.models import DTYPES

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    int: (_is_int, "an integer"),
    float: (_is_number, "a finite number"),
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
        if not _is_number(value) or not ok(value):
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


def matched_lora_rank(model: nn.Module, cfg: LoRAMoEConfig) -> int:
    """The LoRA rank whose trainable parameters on LoRAMoE's targets come closest to LoRAMoE's own."""
    names = resolve_targets(model, cfg)
    shapes = [linear_features(model.get_submodule(n)) for n in names]
    moe = sum(cfg.num_experts * (cfg.rank * (d_in + d_out) + d_in) for d_in, d_out in shapes)
    return max(1, round(moe / sum(d_in + d_out for d_in, d_out in shapes)))


def prepare_model(model: nn.Module, run: RunConfig) -> nn.Module:
    """Adapt (loramoe), wrap with PEFT (lora) or unfreeze (full) the base model."""
    if run.method == "loramoe":
        return inject(model, run.loramoe)
    if run.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    cfg = run.loramoe
    rank = run.lora.rank or matched_lora_rank(model, cfg)
    alpha = run.lora.alpha if run.lora.alpha is not None else cfg.scaling * rank
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=run.lora.dropout if run.lora.dropout is not None else cfg.dropout,
        target_modules=resolve_targets(model, cfg),  # full names: PEFT matches them exactly
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


class LoRAMoETrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is ``loramoe.compute_loss`` (task-typed LBC) and whose checkpoints hold
    adapter files. For the ``lora`` and ``full`` baselines it only drops ``task_types`` before the model sees them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stat_sums: dict[str, float] = {}
        self._stat_counts: dict[str, int] = {}

    @property
    def is_loramoe(self) -> bool:
        return getattr(self.accelerator.unwrap_model(self.model), CONFIG_ATTR, None) is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kwargs = {}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        inputs = dict(inputs)
        if not self.is_loramoe:
            inputs.pop("task_types", None)
            outputs = model(**inputs, **kwargs)
            self._check_finite(outputs.loss)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        task_types = inputs.get("task_types")
        parts = compute_loss(model, inputs, record=model.training, **kwargs)
        self._check_finite(parts.total)
        if model.training:
            self._accumulate({"lm_loss": parts.lm.detach(), "lbc_loss": parts.lbc.detach()})
            if task_types is not None and parts.router_probs:
                cfg = get_config(model)
                self._accumulate(
                    routing_stats(
                        parts.router_probs,
                        task_types,
                        group_of_expert=cfg.group_of_expert(),
                        task_names=cfg.task_names,
                        mask_BT=inputs.get("attention_mask"),
                    )
                )
        return (parts.total, parts.outputs) if return_outputs else parts.total

    def _save_checkpoint(self, model, trial) -> None:
        # A finite loss at step N does not make the update of step N finite; never mark such weights as good.
        check_parameters_finite(self.model, self.state.global_step)
        super()._save_checkpoint(model, trial)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if self.model.training and not bool(torch.isfinite(loss.detach()).all()):
            last = latest_good_checkpoint(self.args.output_dir, quiet=True)
            raise TrainingError(
                f"loss is {loss.item()} at step {self.state.global_step + 1}; training stopped before the update. "
                f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
            )

    def _accumulate(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self._stat_sums[key] = self._stat_sums.get(key, 0.0) + float(value)
            self._stat_counts[key] = self._stat_counts.get(key, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stat_counts:  # a training log: add our parts, averaged since the last one
            for key, total in self._stat_sums.items():
                logs[key] = round(total / self._stat_counts[key], 6)
            self._stat_sums.clear()
            self._stat_counts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.is_loramoe:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        save_adapter(model, output_dir, base_name_or_path=getattr(model, "name_or_path", None))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self.is_loramoe:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


def check_parameters_finite(model: nn.Module, step: int) -> None:
    """Raise ``TrainingError`` naming ``step`` if a trainable parameter holds NaN or infinity."""
    bad = [
        name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())
    ]
    if bad:
        raise TrainingError(
            f"parameters became NaN or infinite after step {step} ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
            "they were not saved. Lower the learning rate or check the data, then resume from the last good "
            "checkpoint."
        )


class CompleteCheckpointCallback(TrainerCallback):
    """After a checkpoint is fully written, record the checksum of each of its files in a marker, atomically."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder)
        return control


def mark_complete(folder: Path) -> None:
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER
    }
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=1, sort_keys=True))


def checkpoint_is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return bool(files) and all(sha256_file(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _checkpoints(root: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``root``, newest (largest N) first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good_checkpoint(output_dir: str | os.PathLike, *, quiet: bool = False) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose completion marker verifies; torn ones are reported."""
    for folder in _checkpoints(Path(output_dir)):
        if checkpoint_is_complete(folder):
            return str(folder)
        if not quiet:
            logger.warning(
                "skipping %s: torn or incomplete checkpoint (no valid %s); using an older one",
                folder,
                COMPLETE_MARKER,
            )
    return None


def _remove_torn_checkpoints(root: Path, keep: str | None) -> None:
    """Delete the checkpoints newer than ``keep`` (all when None): they are torn, and the resumed run would
    otherwise write its own checkpoint of the same step over their leftovers."""
    for folder in _checkpoints(root):
        if keep is not None and folder == Path(keep):
            return
        logger.warning("removing torn checkpoint %s", folder)
        shutil.rmtree(folder)


def build_trainer(run: RunConfig) -> LoRAMoETrainer:
    """Load the base model, adapt it as ``run.method`` says, build the data, and return the ready Trainer.

    The base model is loaded on the CPU; the Trainer places it on the device (or devices) of the run.
    """
    from transformers import set_seed

    from loramoe.data import DataCollatorForLoRAMoE, build_dataset
    from loramoe.models import load_base

    args = run.training_arguments()
    out = Path(args.output_dir)
    # The adapter's initialisation draws from the global RNG: seed it (as the Trainer does later) so that a run,
    # and a resumed run, are reproducible in one process as well as in a fresh one.
    set_seed(args.seed)
    model, tokenizer = load_base(run.model, dtype=run.dtype, device="cpu")
    model = prepare_model(model, run)
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out / RUN_CONFIG_NAME, json.dumps(run.to_dict(), indent=2, sort_keys=True, default=str)
        )
    if run.method == "loramoe":
        logger.info("%s", summary(model))
    built = build_dataset(run.data, tokenizer, run.loramoe.task_names)
    trainer = LoRAMoETrainer(
        model=model,
        args=args,
        train_dataset=built.train,
        eval_dataset=built.val,
        data_collator=DataCollatorForLoRAMoE(tokenizer),
        processing_class=tokenizer,
        callbacks=[CompleteCheckpointCallback()],
    )
    trainer.data_stats = built.stats
    return trainer


def train(run: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train as ``run`` says and write the adapter (or model), the resolved config, trainer state and metrics.

    Args:
        run: the validated run configuration.
        resume: continue from the newest complete checkpoint in the output directory (fresh start if none).

    Returns:
        The training metrics (also written to ``train_results.json``).

    Raises:
        ConfigError: a fresh run (``resume=False``) into an output directory that holds checkpoints: the new run
            would mix its checkpoints with the old run's, and a later resume could continue the wrong one.
    """
    earlier = _checkpoints(Path(run.training["output_dir"]))
    if not resume and earlier:
        raise ConfigError(
            f"training.output_dir {run.training['output_dir']!r} holds checkpoints of an earlier run "
            f"({earlier[0].name}, ...); resume it (--resume), or choose a new output_dir or delete them"
        )
    trainer = build_trainer(run)
    out = Path(trainer.args.output_dir)
    checkpoint = latest_good_checkpoint(out) if resume else None
    if resume:
        logger.info("resuming from %s", checkpoint or "the start (no complete checkpoint found)")
        if trainer.args.should_save:
            _remove_torn_checkpoints(out, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    check_parameters_finite(trainer.model, trainer.state.global_step)
    trainer.save_model(str(out))
    metrics = dict(result.metrics)
    metrics["data"] = trainer.data_stats.to_dict()
    if trainer.is_world_process_zero():
        trainer.save_state()
        atomic_write_text(
            out / "train_results.json", json.dumps(metrics, indent=2, sort_keys=True, default=str)
        )
    return metrics


def learning_curve(output_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, loss) pairs from a finished run's ``trainer_state.json``."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e and math.isfinite(e["loss"])]


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
    from loramoe.models import DTYPES, load_base

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
    from loramoe.models import load_base

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
