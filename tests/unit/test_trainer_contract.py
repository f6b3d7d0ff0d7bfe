"""The transformers Trainer API that loramoe's Trainers rely on beyond its public hooks.

``training/trainer.py`` overrides or calls a few private Trainer methods where transformers offers no public hook,
and sizes the LBC's share of an optimizer step by how ``training_step`` treats the loss. A transformers release that
renames one of them, changes its parameters or stops calling it would break training silently (an override that is
never called saves the whole model, or skips the owner marker, or stops checking the gradient norm). These tests
fail first, naming the method. pyproject.toml bounds transformers to the releases they passed on: raise the bound
only after they pass on the new release.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME
from loramoe.config import LoRAMoEConfig
from loramoe.inject import inject
from loramoe.training.trainer import GuardedTrainer, LoRAMoETrainer

from tiny import tiny_model

# name -> the parameters loramoe's override or call passes, in order.
PRIVATE = {
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_get_grad_norm": ("model", "grad_norm"),
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
}
# Public methods whose parameters the overrides and the loss scaling depend on.
PUBLIC = {
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "training_step": ("model", "inputs", "num_items_in_batch"),
}


def where() -> str:
    return (
        f"transformers {transformers.__version__}: update src/loramoe/training/trainer.py for it, then the bound "
        "on transformers in pyproject.toml"
    )


@pytest.mark.parametrize("name", [*PRIVATE, *PUBLIC])
def test_the_trainer_methods_loramoe_overrides_keep_their_parameters(name):
    want = {**PRIVATE, **PUBLIC}[name]
    method = getattr(Trainer, name, None)
    assert method is not None, f"Trainer.{name} no longer exists in {where()}"
    got = tuple(p for p in inspect.signature(method).parameters if p != "self")
    assert got == want, f"Trainer.{name} now takes {got}, loramoe passes {want}; {where()}"


@pytest.mark.parametrize("name", list(PRIVATE))
def test_the_trainer_still_calls_each_private_method_loramoe_overrides(name):
    source = inspect.getsource(Trainer)
    assert f"self.{name}(" in source, (
        f"Trainer no longer calls self.{name}(...), so the override is dead; {where()}"
    )


@pytest.fixture
def trainer(tmp_path: Path) -> LoRAMoETrainer:
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2, dropout=0.0))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_only_model=True
    )
    return LoRAMoETrainer(model=model, args=args, run_id="contract")


def test_the_output_dir_without_a_trial_is_the_runs_output_dir(trainer):
    assert trainer._get_output_dir(trial=None) == trainer.args.output_dir, (
        f"Trainer._get_output_dir(trial=None) is no longer args.output_dir; {where()}"
    )


def test_the_grad_norm_hook_passes_a_given_norm_through(trainer):
    got = Trainer._get_grad_norm(trainer, trainer.model, grad_norm=torch.tensor(2.5))
    assert float(got) == 2.5, f"Trainer._get_grad_norm no longer returns the norm it is given; {where()}"


def test_save_model_reaches_the_save_override_and_writes_an_adapter(trainer, tmp_path: Path):
    trainer.save_model(str(tmp_path / "saved"))
    written = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert CONFIG_NAME in written and WEIGHTS_NAME in written, (
        f"Trainer.save_model no longer goes through Trainer._save (wrote {written}); {where()}"
    )


def test_save_checkpoint_writes_checkpoint_of_the_global_step_under_the_output_dir(tmp_path: Path):
    # GuardedTrainer names the folder before calling the stock _save_checkpoint; both must agree.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_only_model=True)
    stock = Trainer(model=tiny_model("llama"), args=args)
    stock.state.global_step = 7
    stock._save_checkpoint(stock.model, trial=None)
    assert (tmp_path / "checkpoint-7" / "trainer_state.json").is_file(), (
        f"Trainer._save_checkpoint no longer writes <output_dir>/checkpoint-<global_step>; {where()}"
    )


def test_the_guarded_trainer_overrides_only_methods_listed_here():
    overridden = {name for name in vars(GuardedTrainer) | vars(LoRAMoETrainer) if hasattr(Trainer, name)}
    private = {name for name in overridden if name.startswith("_") and not name.startswith("__")}
    assert private <= set(PRIVATE), (
        f"private Trainer overrides without a contract here: {private - set(PRIVATE)}"
    )


class _FixedLoss(Trainer):
    """A Trainer whose loss is 1.0 (with a gradient path), to read how ``training_step`` scales it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return next(p for p in model.parameters() if p.requires_grad).sum() * 0 + 1.0


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
@pytest.mark.parametrize("num_items", [None, 5])
def test_training_step_divides_by_accumulation_unless_the_loss_is_token_averaged(
    tmp_path: Path, accepts_loss_kwargs: bool, num_items: int | None
):
    # LoRAMoETrainer.lbc_scale relies on this rule: the loss is used as it is when the model takes
    # num_items_in_batch (a token average over the accumulated batch), otherwise divided by the micro-batches.
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_accumulation_steps=4
    )
    trainer = _FixedLoss(model=tiny_model("llama"), args=args)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.current_gradient_accumulation_steps = 4
    ids = torch.tensor([[3, 4, 5]])
    loss = trainer.training_step(
        trainer.model, {"input_ids": ids, "labels": ids}, num_items_in_batch=num_items
    )
    want = 1.0 if accepts_loss_kwargs and num_items is not None else 0.25
    assert float(loss) == pytest.approx(want), (
        f"Trainer.training_step returned {float(loss)} for a loss of 1.0 with 4 accumulation steps "
        f"(model_accepts_loss_kwargs={accepts_loss_kwargs}, num_items_in_batch={num_items}), loramoe expects "
        f"{want}: LoRAMoETrainer.lbc_scale must follow the new rule; {where()}"
    )
