"""The loss parts and router statistics a LoRAMoE run logs, as a Trainer callback.

Every training step adds its values to sums kept on the device; only a logging step reads them back (one host
transfer per log, not per step) and adds their means to the log: ``lm_loss`` and ``lbc_loss`` (mean over steps),
and per task type ``router/<type>/mass_<group>`` and ``router/<type>/entropy`` (mean over that type's samples,
each sample averaged over its positions and the layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from loramoe.routing import routing_sums

if TYPE_CHECKING:
    from loramoe.loss import LossParts


class RouterStatsCallback(TrainerCallback):
    """Accumulates on the device what ``LoRAMoETrainer.compute_loss`` hands it; adds the means to training logs.

    It must run before the reporting callbacks (``report_to``) so that they see the statistics:
    ``LoRAMoETrainer`` puts it first.
    """

    def __init__(self, task_names: tuple[str, ...], group_of_expert: list[int]) -> None:
        self.task_names, self.group_of_expert = task_names, group_of_expert
        self._losses: torch.Tensor | None = None  # (2,): lm, lbc summed over steps
        self._steps = 0
        self._routing: dict[str, torch.Tensor] | None = None

    def add(
        self,
        lm: torch.Tensor,
        lbc: torch.Tensor,
        router_probs: dict[str, torch.Tensor],
        task_types_B: torch.Tensor | None,
        mask_BT: torch.Tensor | None,
    ) -> None:
        """Add one training step's loss parts and, when it has task types, its routing sums."""
        losses = torch.stack([lm.detach().float(), lbc.detach().float()])
        self._losses = losses if self._losses is None else self._losses + losses
        self._steps += 1
        if task_types_B is None or not router_probs:
            return
        sums = routing_sums(
            router_probs,
            task_types_B,
            group_of_expert=self.group_of_expert,
            num_types=len(self.task_names),
            mask_BT=mask_BT,
        )
        self._routing = sums if self._routing is None else {k: self._routing[k] + v for k, v in sums.items()}

    def add_parts(self, parts: LossParts, batch: Mapping[str, Any], step_share: float = 1.0) -> None:
        """``add`` of one micro-batch's ``loramoe.compute_loss`` result and the batch it was computed on.

        ``step_share`` is the part of an optimizer step's LM loss that ``parts.lm`` stands for: ``1/k`` when the
        Trainer accumulates k micro-batches of a loss averaged over the whole accumulated batch (each one's loss is
        then its token sum over all the step's tokens). Dividing by it puts the logged ``lm_loss`` on the scale of
        the Trainer's own ``loss`` log, whatever the accumulation."""
        self.add(
            parts.lm / step_share,
            parts.lbc,
            parts.router_probs,
            batch.get("task_types"),
            batch.get("attention_mask"),
        )

    def means(self) -> dict[str, float]:
        """The means since the last call (one read from the device), and a fresh start."""
        if self._losses is None:
            return {}
        parts = [self._losses / self._steps]
        if self._routing is not None:
            parts += [self._routing["mass"].flatten(), self._routing["entropy"], self._routing["count"]]
        flat = torch.cat(parts).tolist()  # the only host read
        out = {"lm_loss": round(flat[0], 6), "lbc_loss": round(flat[1], 6)}
        if self._routing is not None:
            out |= self._routing_means(flat[2:])
        self._losses, self._steps, self._routing = None, 0, None
        return out

    def _routing_means(self, flat: list[float]) -> dict[str, float]:
        k, g = len(self.task_names), self._routing["mass"].shape[1]
        mass, entropy, count = flat[: k * g], flat[k * g : k * g + k], flat[k * g + k :]
        out: dict[str, float] = {}
        for t, type_name in enumerate(self.task_names):
            if count[t] == 0:  # no sample of this type since the last log
                continue
            for group, group_name in enumerate(self.task_names[:g]):
                out[f"router/{type_name}/mass_{group_name}"] = round(mass[t * g + group] / count[t], 6)
            out[f"router/{type_name}/entropy"] = round(entropy[t] / count[t], 6)
        return out

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if logs is not None and "loss" in logs:  # a training log (not eval, not the final summary)
            values = self.means()
            logs.update(values)
            if state.log_history:  # Trainer.log appended this log's record just before calling us
                state.log_history[-1].update(values)
        return control
