"""Per request: the mean router mass on each expert and each expert group, for its prompt and its completion.

The completion's positions are the generated tokens the model read back (each step feeds the previous token), so
the last token, never fed, is not counted. Recorded only for forwards in which some row asked for it.
"""

from __future__ import annotations

from typing import Any

import torch

from loramoe.inject import get_config
from loramoe.routing import RouterRecorder


class RouterStats:
    """The model's expert groups and the per-row sums of one forward's router records."""

    def __init__(self, model: Any, device: torch.device):
        cfg = get_config(model)
        self.group_names = tuple(cfg.task_names)
        self.onehot_NK = torch.nn.functional.one_hot(
            torch.tensor(cfg.group_of_expert(), device=device)
        ).float()

    @staticmethod
    def take(recorder: RouterRecorder) -> tuple[torch.Tensor, int]:
        """The last forward's records summed over layers ``(b, T, N)`` (removed from the recorder), and the layers."""
        records = [records.pop().float() for records in recorder.probs.values()]
        return torch.stack(records).sum(0), len(records)

    def summary(self, totals: Totals) -> dict:
        """Mean router mass per expert and per expert group, over layers and positions, for prompt and output."""
        names = self.group_names
        out: dict = {"groups": list(names)}
        for part, sum_N, positions in (
            ("prompt", totals.prompt_N, totals.prompt_positions),
            ("completion", totals.completion_N, totals.completion_positions),
        ):
            mass_N = sum_N / (totals.layers * max(positions, 1))
            out[part] = {
                "positions": positions,
                "group_mass": dict(zip(names, (mass_N @ self.onehot_NK).tolist())) if positions else None,
                "expert_mass": mass_N.tolist() if positions else None,
            }
        out["layers"] = totals.layers
        return out


class Totals:
    """One request's router sums: over layers and its prompt's positions, and over its completion's."""

    def __init__(self, prompt_TN: torch.Tensor, layers: int):
        self.layers = layers
        self.prompt_N, self.prompt_positions = prompt_TN.sum(0), prompt_TN.shape[0]
        self.completion_N = torch.zeros_like(self.prompt_N)
        self.completion_positions = 0

    def add(self, step_N: torch.Tensor) -> None:
        self.completion_N += step_N
        self.completion_positions += 1
