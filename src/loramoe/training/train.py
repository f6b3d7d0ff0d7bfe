"""Training: the Trainer subclass (loss only), the baselines, and the train entry point.

The run config lives in ``run_config.py`` and crash-safe checkpoints in ``checkpoints.py``; loading a trained
output for inference (``load_trained``) is ``loramoe.models.trained``'s job.

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

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from loramoe.adapter import load_adapter_weights, save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import ConfigError, TrainingError
from loramoe.files import atomic_write_text
from loramoe.inject import CONFIG_ATTR, get_config, inject, resolve_targets, summary
from loramoe.layer import linear_features
from loramoe.loss import compute_loss
from loramoe.routing import routing_stats
from loramoe.training.checkpoints import (
    CompleteCheckpointCallback,
    latest_good_checkpoint,
    list_checkpoints,
    remove_torn_checkpoints,
)
from loramoe.training.run_config import RUN_CONFIG_NAME, RunConfig

logger = logging.getLogger("loramoe.train")


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
        # Under FSDP and DeepSpeed ZeRO-3 the Trainer passes the state it gathered from the shards.
        name = getattr(model, "name_or_path", None)
        save_adapter(model, output_dir, base_name_or_path=name, model_state=state_dict)
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


def build_trainer(run: RunConfig) -> LoRAMoETrainer:
    """Load the base model, adapt it as ``run.method`` says, build the data, and return the ready Trainer.

    The base model is loaded on the CPU; the Trainer places it on the device (or devices) of the run.
    """
    from transformers import set_seed

    from loramoe.data.dataset import DataCollatorForLoRAMoE, build_dataset
    from loramoe.models.base import load_base

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
    check_launch(trainer.accelerator.distributed_type)
    return trainer


def check_launch(kind: Any) -> None:
    """Refuse a launch that accelerate would silently run otherwise than it was asked to.

    Args:
        kind: the ``accelerate.DistributedType`` accelerate chose for this process.

    Raises:
        ConfigError: several processes left unconnected (each would train alone and overwrite the others'
            files), or an FSDP / DeepSpeed config that accelerate replaced by plain data parallelism. accelerate
            (1.16, ``state.py``) enables FSDP and DeepSpeed only on accelerators; on the CPU it runs DDP over gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and kind.value == "NO":
        raise ConfigError(
            f"{world} processes were launched but accelerate connected none of them (no GPU was found and "
            "training.use_cpu is not set): each would train alone and overwrite the others' output. Set "
            "training.use_cpu: true to train them together on the CPU (DDP over gloo)"
        )
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and kind.value != engine:
            raise ConfigError(
                f"the accelerate config asks for {engine}, but accelerate runs this job as {kind.value}: it enables "
                f"{engine} only on accelerators (CUDA, XPU, NPU, ...), never on the CPU. On the CPU launch with "
                "examples/accelerate/ddp.yaml; sharded training on the CPU is tested with torch's own FSDP2 "
                "(tests/scripts/fsdp_train.py)"
            )


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
    earlier = list_checkpoints(Path(run.training["output_dir"]))
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
            remove_torn_checkpoints(out, checkpoint)
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
