"""The Trainers: a guarded stock Trainer, and the LoRAMoE Trainer on top of it.

Design decisions:
- ``LoRAMoETrainer`` changes only how the loss is computed (``loramoe.compute_loss``), how the adapter is saved
  (adapter files instead of the whole model) and loaded on resume; everything else is the stock ``Trainer``, so
  ``report_to``, DDP under ``torchrun`` / ``accelerate launch``, bf16 and gradient checkpointing work as users
  expect. The baselines' Trainer is in ``baselines.py``; both share ``GuardedTrainer``.
- A NaN or infinite loss stops the run before the optimiser step, naming the step; the last good checkpoint stays.
  Checking it reads one scalar per step back to the host, kept on purpose, because after the update the weights
  are already damaged. The gradient norm is checked the same way, once per optimiser step: an infinite norm would
  clip every gradient to zero and the run would end "successfully", untrained.
- Checkpoints are this run's: each ``checkpoint-N`` is created with the run's owner marker inside before the
  Trainer writes it, and ``save_total_limit`` rotation is done here, after the new checkpoint verifies
  (transformers gets no limit, so it deletes nothing); see ``checkpoints.py``.
- Loss parts and router statistics are summed on the device and read back only on logging steps
  (``RouterStatsCallback``).
- Public Trainer API first: the LM term is the stock ``compute_loss`` (its scaling across processes included),
  statistics are a callback. Private methods remain only where transformers has no public hook: the checkpoint
  folder (``_save_checkpoint``, ``_get_output_dir``), the gradient norm before the step (``_get_grad_norm``), the
  model files given the state gathered under FSDP / ZeRO-3 (``_save``) and loading them on resume
  (``_load_from_checkpoint``). ``tests/unit/test_trainer_contract.py`` pins each one's signature and behaviour; it
  decides the upper bound on transformers in pyproject.toml.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from loramoe.errors import FileSystemError, LoRAMoEError, TrainingError, is_write_fault
from loramoe.inject import get_config
from loramoe.loss import compute_loss
from loramoe.models.quantization import adapters_attached
from loramoe.training.checkpoints import begin_checkpoint, latest_good_checkpoint, rotate_checkpoints
from loramoe.training.completion import checkpoint_is_complete, mark_complete
from loramoe.training.sharded import load_sharded_adapter_weights, save_sharded_adapter
from loramoe.training.stats import RouterStatsCallback


class GuardedTrainer(Trainer):
    """The stock Trainer, stopped by a non-finite loss or gradient norm before the update, never checkpointing
    non-finite weights, and writing, verifying and rotating only checkpoints of its own run.

    Args:
        run_id: the output directory's owner (``checkpoints.claim_output_dir``): the checkpoints this run may
            replace or rotate. Required to save checkpoints.
        save_total_limit: the run's ``save_total_limit``, applied here after verification (give the Trainer's
            own arguments ``save_total_limit=None``).
    """

    def __init__(
        self, *args, run_id: str | None = None, save_total_limit: int | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_id = run_id
        self.save_total_limit = save_total_limit

    def _save_checkpoint(self, model, trial) -> None:
        # A finite loss at step N does not make the update of step N finite; never mark such weights as good.
        check_parameters_finite(self.model, self.state.global_step)
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and self.run_id is None:
            raise TrainingError(f"{run_dir}: no run id; train through loramoe's train() or build_trainer()")
        try:
            if self.args.should_save:
                begin_checkpoint(folder, self.run_id)  # the owner marker goes in before any other file
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process has written its files (its RNG state) by now
            if self.args.should_save:
                mark_complete(folder, self.run_id)
        except Exception as err:
            if isinstance(err, LoRAMoEError) or not is_write_fault(err):
                raise
            # Without its completion marker the folder is torn: a resume skips it and removes it.
            where = getattr(err, "filename", None) or folder
            raise FileSystemError.from_fault(err, where, doing="writing the checkpoint") from err
        if self.args.should_save:
            if not checkpoint_is_complete(folder):
                raise TrainingError(f"{folder}: written but does not verify; check the disk, then resume")
            rotate_checkpoints(run_dir, self.run_id, self.save_total_limit, self.state.best_model_checkpoint)

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimiser step, before the step.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and self.model.training and not math.isfinite(float(grad_norm)):
            self._stop(f"gradient norm is {float(grad_norm)}")
        return grad_norm

    def check_loss(self, loss: torch.Tensor) -> None:
        """Raise ``TrainingError`` (naming the step and the last good checkpoint) for a non-finite training loss."""
        if self.model.training and not bool(torch.isfinite(loss.detach()).all()):
            self._stop(f"loss is {loss.item()}")

    def _stop(self, what: str) -> None:
        last = latest_good_checkpoint(self.args.output_dir, quiet=True, run_id=self.run_id)
        raise TrainingError(
            f"{what} at step {self.state.global_step + 1}; training stopped before the update. "
            f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
        )

    def lbc_scale(self, model: nn.Module, num_items_in_batch) -> float:
        """The LBC's share of one optimizer step.

        The Trainer backpropagates a loss normalised by ``num_items_in_batch`` (when the model accepts it) as it
        is, since that LM loss is already an average over the whole accumulated batch; any other loss it divides by
        the number of accumulated micro-batches. The LBC is a mean over one micro-batch, so in the first case it
        is divided here, and counts once per optimizer step either way.
        """
        if model.training and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return 1.0 / getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
        return 1.0


class LoRAMoETrainer(GuardedTrainer):
    """A ``transformers.Trainer`` whose loss is ``loramoe.compute_loss`` (task-typed LBC) and whose checkpoints hold
    adapter files."""

    def __init__(self, *args, **kwargs) -> None:
        with adapters_attached(kwargs.get("model", args[0] if args else None)):  # a quantized base may train
            super().__init__(*args, **kwargs)
        cfg = get_config(self.accelerator.unwrap_model(self.model))
        self.router_stats = RouterStatsCallback(cfg.task_names, cfg.group_of_expert())
        # First, so that the reporting callbacks (report_to) see the statistics it adds to a log.
        self.callback_handler.callbacks.insert(0, self.router_stats)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stock = super().compute_loss

        def trainer_lm(batch: dict) -> tuple[torch.Tensor, object]:
            # The stock loss, scaled as the Trainer scales it (a loss averaged over the tokens of every process
            # is multiplied by their number, since DDP averages gradients); the LBC is a per-process mean already.
            return stock(model, batch, return_outputs=True, num_items_in_batch=num_items_in_batch)

        scale = self.lbc_scale(model, num_items_in_batch)
        parts = compute_loss(
            model,
            dict(inputs),
            record=model.training,
            forward=trainer_lm,
            lbc_scale=scale,
        )
        total = parts.total
        self.check_loss(total)
        if model.training:
            self.router_stats.add_parts(parts, inputs, step_share=scale)
        return (total, parts.outputs) if return_outputs else total

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        # Under FSDP and DeepSpeed ZeRO-3 the Trainer passes the state it gathered from the shards.
        name = getattr(model, "name_or_path", None)
        data = getattr(self, "data_stats", None)  # set by build_trainer; shown on the adapter's model card
        if self.processing_class is not None:  # first: the adapter's files, written atomically, come last
            self.processing_class.save_pretrained(output_dir)
        save_sharded_adapter(
            model,
            output_dir,
            base_name_or_path=name,
            model_state=state_dict,
            data_summary=data.to_dict() if data is not None else None,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_sharded_adapter_weights(
            self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint
        )


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
