"""Guarantee 3 of docs/reliability.md: never a silently wrong result.

Every adapter config field is required, adapter tensors must be floating-point and finite, an infinite gradient
norm stops the run like a NaN loss, and task types of the wrong shape or kind are data errors. Shared setup:
``guarantees_helpers.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import loramoe.training.train as train_module
from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, DataError, TrainingError
from loramoe.inject import adapted_modules, inject
from loramoe.loss import compute_loss, localized_balancing_loss
from loramoe.routing import routing_sums

from guarantees_helpers import batch, make_root, owned_run
from tiny import tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


@pytest.fixture()
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_adapter(
        inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2, alpha=8)), tmp_path / "a"
    )


def test_every_adapter_config_field_is_required(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    fields = [("config", k) for k in meta["config"]] + [("base_model", k) for k in meta["base_model"]]
    fields += [(None, "weights_sha256")]
    for section, key in fields:
        changed = json.loads(json.dumps(meta))
        (changed[section] if section else changed).pop(key)
        (saved / CONFIG_NAME).write_text(json.dumps(changed))
        model = tiny_model("llama")
        name = f"{section}.{key}" if section else key
        with pytest.raises(AdapterError, match=rf"field '{re.escape(name)}': missing"):
            load_adapter(model, saved)
        assert not adapted_modules(model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_adapter_tensors_must_be_floating(saved, dtype):
    _rewrite_tensor(saved, lambda t: t.to(dtype))
    with pytest.raises(AdapterError, match=rf"lora_A: dtype {dtype}, a floating-point tensor expected"):
        load_adapter(tiny_model("llama"), saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_adapter_tensors_must_be_finite(saved, value):
    _rewrite_tensor(saved, lambda t: t.clone().index_fill_(0, torch.tensor([0]), value))
    with pytest.raises(AdapterError, match=r"lora_A: holds NaN or infinite values"):
        load_adapter(tiny_model("llama"), saved)


def _rewrite_tensor(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    from loramoe.files import sha256_file

    state = load_file(str(folder / WEIGHTS_NAME))
    key = sorted(k for k in state if k.endswith("lora_A"))[0]
    state[key] = change(state[key])
    save_file(state, str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_an_infinite_gradient_norm_stops_the_run_like_a_nan_loss(root, tmp_path, monkeypatch):
    """A loss of 1e30 is finite, but its gradients' norm overflows float32: the clip would zero every gradient
    and the run would "succeed" untrained. It stops before the update, naming the step and the last checkpoint."""
    prepare = train_module.prepare_model
    calls = {"n": 0}

    def huge_from_step_5(model, run):
        model = prepare(model, run)

        def hook(module, args, output):
            calls["n"] += module.training
            if calls["n"] >= 5:
                output.loss = output.loss * 1e30
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "prepare_model", huge_from_step_5)
    out = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"gradient norm is (inf|nan) at step 5.*Last good checkpoint: .*checkpoint-3"
    ):
        owned_run(root, out, max_steps=8)
    assert not (out / WEIGHTS_NAME).exists()


@pytest.mark.parametrize(
    "task_types",
    [torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros((), dtype=torch.long), [0, 1],
     torch.zeros(2), torch.tensor([0, 2])],
    ids=["B-by-1", "wrong-length", "scalar", "python-list", "float", "out-of-range"],
)  # fmt: skip
def test_task_types_of_the_wrong_shape_or_kind_are_data_errors(task_types):
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2)).train()
    with pytest.raises(DataError, match="task_types"):
        compute_loss(model, {**batch(), "task_types": task_types})
    probs = torch.softmax(torch.randn(2, 5, 2), -1)
    if isinstance(task_types, torch.Tensor) and task_types.shape != (2,):
        with pytest.raises(DataError, match=r"task_types must have shape \(2,\)"):
            localized_balancing_loss(probs, task_types, group_of_expert=[0, 1], delta=0.1, weight=0.1)
        with pytest.raises(DataError, match=r"task_types must have shape \(2,\)"):
            routing_sums({"m": probs}, task_types, group_of_expert=[0, 1], num_types=2)
