"""The Trainers: a guarded stock Trainer, and the LoRAMoE Trainer on top of it.

Design decisions:
- ``LoRAMoETrainer`` changes only how the loss is computed (``loramoe.compute_loss``), how the adapter is saved
  (adapter files instead of the whole model) and loaded on resume; everything else is the stock ``Trainer``, so
  ``report_to``, DDP under ``torchrun`` / ``accelerate launch``, bf16 and gradient checkpointing work as users
  expect. The baselines' Trainer is in ``baselines.py``; both share ``GuardedTrainer``.
- A NaN or infinite loss stops the run before the optimiser step, naming the step; the last good checkpoint stays.
  Checking it reads one scalar per step back to the host: the one host sync of a step, kept on purpose, because
  after the update the weights are already damaged.
- Loss parts and router statistics are summed on the device and read back only on logging steps
  (``RouterStatsCallback``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from loramoe.adapter import load_adapter_weights, save_adapter
from loramoe.errors import TrainingError
from loramoe.inject import get_config
from loramoe.loss import compute_loss
from loramoe.training.checkpoints import latest_good_checkpoint
from loramoe.training.stats import RouterStatsCallback


class GuardedTrainer(Trainer):
    """The stock Trainer, stopped by a non-finite loss before the update and never checkpointing non-finite
    weights."""

    def _save_checkpoint(self, model, trial) -> None:
        # A finite loss at step N does not make the update of step N finite; never mark such weights as good.
        check_parameters_finite(self.model, self.state.global_step)
        super()._save_checkpoint(model, trial)

    def check_loss(self, loss: torch.Tensor) -> None:
        """Raise ``TrainingError`` (naming the step and the last good checkpoint) for a non-finite training loss."""
        if self.model.training and not bool(torch.isfinite(loss.detach()).all()):
            last = latest_good_checkpoint(self.args.output_dir, quiet=True)
            raise TrainingError(
                f"loss is {loss.item()} at step {self.state.global_step + 1}; training stopped before the update. "
                f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
            )

    def token_average_scale(self, num_items_in_batch) -> float:
        """The factor the stock Trainer applies to a loss averaged over the tokens of every process: DDP averages
        gradients over processes, so a loss divided by the global token count is multiplied back by their number.
        """
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            scale = self.accelerator.num_processes // self.get_tp_size()
            return scale if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1


class LoRAMoETrainer(GuardedTrainer):
    """A ``transformers.Trainer`` whose loss is ``loramoe.compute_loss`` (task-typed LBC) and whose checkpoints hold
    adapter files."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = get_config(self.accelerator.unwrap_model(self.model))
        self.router_stats = RouterStatsCallback(cfg.task_names, cfg.group_of_expert())
        # First, so that the reporting callbacks (report_to) see the statistics it adds to a log.
        self.callback_handler.callbacks.insert(0, self.router_stats)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kwargs = {}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        parts = compute_loss(model, dict(inputs), record=model.training, **kwargs)
        # The LM loss is averaged over the tokens of all processes (as the stock Trainer does); the LBC is
        # a per-process mean already, which DDP's gradient averaging keeps as it is.
        total = parts.lm * self.token_average_scale(num_items_in_batch) + parts.lbc.to(parts.lm.dtype)
        self.check_loss(total)
        if model.training:
            self.router_stats.add(
                parts.lm,
                parts.lbc,
                parts.router_probs,
                inputs.get("task_types"),
                inputs.get("attention_mask"),
            )
        return (total, parts.outputs) if return_outputs else total

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
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
