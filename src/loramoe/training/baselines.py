"""The baselines every user compares LoRAMoE against: plain LoRA (PEFT, same targets, rank matched to LoRAMoE's
trainable budget) and full fine-tuning, trained by the stock Trainer's loss. Task types are ignored by both."""

from __future__ import annotations

from torch import nn

from loramoe.config import LoRAMoEConfig
from loramoe.inject import resolve_targets
from loramoe.layer import linear_features
from loramoe.training.run_config import LoraBaselineConfig
from loramoe.training.trainer import GuardedTrainer


def matched_lora_rank(model: nn.Module, cfg: LoRAMoEConfig) -> int:
    """The LoRA rank whose trainable parameters on LoRAMoE's targets come closest to LoRAMoE's own."""
    names = resolve_targets(model, cfg)
    shapes = [linear_features(model.get_submodule(n)) for n in names]
    moe = sum(cfg.num_experts * (cfg.rank * (d_in + d_out) + d_in) for d_in, d_out in shapes)
    return max(1, round(moe / sum(d_in + d_out for d_in, d_out in shapes)))


def unfreeze(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def wrap_lora(model: nn.Module, cfg: LoRAMoEConfig, lora: LoraBaselineConfig) -> nn.Module:
    """PEFT LoRA on LoRAMoE's targets; unset settings follow LoRAMoE's (rank: the matched budget)."""
    from peft import LoraConfig, get_peft_model

    rank = lora.rank or matched_lora_rank(model, cfg)
    settings = LoraConfig(
        r=rank,
        lora_alpha=lora.alpha if lora.alpha is not None else cfg.scaling * rank,
        lora_dropout=lora.dropout if lora.dropout is not None else cfg.dropout,
        target_modules=resolve_targets(model, cfg),  # full names: PEFT matches them exactly
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, settings)


class BaselineTrainer(GuardedTrainer):
    """The stock Trainer's loss, with the batch's ``task_types`` dropped before the model sees them."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "task_types"}
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self.check_loss(loss)
        return (loss, outputs) if return_outputs else loss
