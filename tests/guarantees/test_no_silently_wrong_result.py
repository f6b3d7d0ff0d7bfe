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


def test_a_special_token_written_in_a_record_is_counted_warned_about_or_refused(
    root, tmp_path, caplog, capsys
):
    """``<|im_end|>`` quoted in an answer is tokenised as the tokenizer's end-of-turn token: the run counts such
    samples in train_results.json and warns naming the first record (default), or stops at it (``refuse``)."""
    import yaml

    from guarantees_helpers import RECORDS, cli_error, config
    from tiny import tiny_tokenizer

    quoted = {
        "instruction": "How does ChatML end a turn?",
        "output": "With <|im_end|> after it.",
        "task_type": 0,
    }
    data = tmp_path / "quoted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], quoted, *RECORDS[1:]]))
    raw = config(root, tmp_path / "out", max_steps=1)
    raw["data"]["sources"] = [{"path": str(data)}]

    from loramoe.data.dataset import build_dataset
    from loramoe.data.sources import DataConfig

    built = build_dataset(DataConfig.from_dict({**raw["data"], "seed": 0}), tiny_tokenizer())
    assert built.stats.special_token_samples == 1
    assert built.stats.special_token_first == "quoted.jsonl:2 answer '<|im_end|>'"
    eos = tiny_tokenizer().eos_token_id
    sample = next(f for f in built.train if f["labels"].count(eos) == 2)  # the quoted one and the real end
    assert sample["labels"][-1] == eos

    caplog.set_level("WARNING", logger="loramoe.data")
    owned_run_dir = tmp_path / "out"
    train_module.train(train_module.RunConfig.from_dict(raw))
    results = json.loads((owned_run_dir / "train_results.json").read_text())
    assert results["data"]["special_token_samples"] == 1
    assert any("quoted.jsonl:2 answer '<|im_end|>'" in r.getMessage() for r in caplog.records)

    refuse = {**raw, "data": {**raw["data"], "special_tokens_in_text": "refuse"}}
    refuse["training"] = {**raw["training"], "output_dir": str(tmp_path / "out2")}
    (tmp_path / "refuse.yaml").write_text(yaml.safe_dump(refuse))
    line = cli_error(capsys, ["train", str(tmp_path / "refuse.yaml")])
    assert re.search(r"quoted\.jsonl:2: the answer holds '<\|im_end\|>', a special token", line), line
    assert not (tmp_path / "out2" / "adapter_model.safetensors").exists()

    caplog.clear()
    allow = DataConfig.from_dict({**raw["data"], "special_tokens_in_text": "allow"})
    assert build_dataset(allow, tiny_tokenizer()).stats.special_token_samples == 1  # counted, not warned
    assert not any("special token" in r.getMessage() for r in caplog.records)


def test_changing_the_special_token_check_on_resume_is_allowed(root, tmp_path):
    """The check changes no sample, so a run started without it (an earlier loramoe) or with another setting
    resumes; a change of a setting that does change samples is still refused."""
    from loramoe.errors import ConfigError
    from loramoe.training.run_config import RunConfig
    from loramoe.training.train import RUN_CONFIG_NAME, check_resume_config

    from guarantees_helpers import config

    raw = config(root, tmp_path)
    before = RunConfig.from_dict(raw).to_dict()
    del before["data"]["special_tokens_in_text"]
    (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps(before, default=str))
    check_resume_config(tmp_path, RunConfig.from_dict(raw))
    check_resume_config(
        tmp_path, RunConfig.from_dict({**raw, "data": {**raw["data"], "special_tokens_in_text": "refuse"}})
    )
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        check_resume_config(tmp_path, RunConfig.from_dict({**raw, "data": {**raw["data"], "max_length": 40}}))
