"""RouterStatsCallback: sums on the device every step, one read per log (training/stats.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState

from loramoe.training.stats import RouterStatsCallback

NAMES = ("downstream", "knowledge")
GROUPS = [0, 0, 1, 1]


def step(device: str, types: list[int]):
    probs = {"a": torch.softmax(torch.randn(len(types), 3, 4), -1).to(device)}
    return (
        torch.tensor(2.0, device=device),
        torch.tensor(0.5, device=device),
        probs,
        torch.tensor(types),
        torch.ones(len(types), 3, dtype=torch.long, device=device),
    )


def test_a_training_step_reads_nothing_back_from_the_device():
    # On the meta device any read of a value (.item(), .tolist(), bool()) raises: add() must not need one.
    stats = RouterStatsCallback(NAMES, GROUPS)
    for _ in range(3):
        stats.add(*step("meta", [0, 1, 1]))
    assert stats._losses.device.type == "meta" and stats._routing["mass"].device.type == "meta"


def test_a_log_gets_the_means_since_the_last_log_in_logs_and_history():
    stats = RouterStatsCallback(NAMES, GROUPS)
    stats.add(*step("cpu", [0, 0]))
    stats.add(*step("cpu", [0, 0]))
    state, logs = TrainerState(), {"loss": 2.5}
    state.log_history.append({**logs, "step": 2})
    stats.on_log(None, state, TrainerControl(), logs=logs)
    assert logs["lm_loss"] == 2.0 and logs["lbc_loss"] == 0.5
    assert logs["router/downstream/mass_downstream"] + logs[
        "router/downstream/mass_knowledge"
    ] == pytest.approx(1)
    assert not any(k.startswith("router/knowledge/") for k in logs)  # no knowledge sample since the last log
    assert state.log_history[-1] == {**logs, "step": 2}
    assert stats.means() == {}  # a fresh start after each log


def test_an_eval_or_summary_log_is_left_alone():
    stats = RouterStatsCallback(NAMES, GROUPS)
    stats.add(*step("cpu", [1]))
    logs = {"eval_loss": 1.0}
    stats.on_log(None, TrainerState(), TrainerControl(), logs=logs)
    assert logs == {"eval_loss": 1.0} and stats._steps == 1
