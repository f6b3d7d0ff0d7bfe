"""Training on tiny real models: the loss goes down, the loss parts and router statistics are logged, the output
directory holds what it promises, the baselines train, and ``load_trained`` loads each method's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramoe.cli import main
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, TrainingError
from loramoe.models.trained import load_trained
from loramoe.training.baselines import matched_lora_rank
from loramoe.training.checkpoints import latest_good_checkpoint
from loramoe.training.run_config import RUN_CONFIG_NAME, RunConfig
from loramoe.training.train import train
from loramoe.training.trainer import check_parameters_finite

from tiny import tiny_model, tiny_tokenizer

RECORDS = [
    {"instruction": "Say hi.", "output": "hi", "task_type": 0},
    {"instruction": "Say bye.", "output": "bye", "task_type": 0},
    {"question": "Capital of France?", "answer": "Paris", "task_type": 1},
    {"question": "Capital of Peru?", "answer": "Lima", "task_type": 1},
]


def learning_curve(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a finished run's ``trainer_state.json``."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e and math.isfinite(e["loss"])]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    tiny_model("llama").save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    alpaca, qa = RECORDS[:2], RECORDS[2:]
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca * 4))
    (root / "qa.json").write_text(json.dumps(qa * 4))
    return root


def run_config(root: Path, out: Path, method: str = "loramoe", **training) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": str(root / "base"),
            "method": method,
            "loramoe": {"num_experts": 4, "rank": 2, "dropout": 0.0},
            "data": {"sources": [str(root / "alpaca.jsonl"), str(root / "qa.json")], "max_length": 48},
            "training": {"output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 4,
                         "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 6, "use_cpu": True,
                         "disable_tqdm": True, **training},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def loramoe_run(files) -> tuple[Path, dict]:
    out = files / "loramoe"
    return out, train(run_config(files, out))


def test_loramoe_run_loss_goes_down(loramoe_run):
    out, metrics = loramoe_run
    losses = [loss for _, loss in learning_curve(out)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert metrics["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-3)


def test_loramoe_run_logs_loss_parts_and_router_stats(loramoe_run):
    out, _ = loramoe_run
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    for entry in logs:
        assert entry["loss"] == pytest.approx(
            entry["lm_loss"] + entry["lbc_loss"], abs=1e-4
        )  # lbc is weighted
        assert entry["lbc_loss"] >= 0
    router = {k for e in logs for k in e if k.startswith("router/")}
    for task in ("downstream", "knowledge"):
        assert {
            f"router/{task}/mass_downstream",
            f"router/{task}/mass_knowledge",
            f"router/{task}/entropy",
        } <= router
    masses = [(e["router/knowledge/mass_downstream"], e["router/knowledge/mass_knowledge"]) for e in logs
              if "router/knowledge/mass_knowledge" in e]  # fmt: skip
    assert all(a + b == pytest.approx(1, abs=1e-4) for a, b in masses)


def test_logged_loss_parts_add_up_to_the_trainers_loss_under_gradient_accumulation(files, tmp_path):
    # Each micro-batch's LM term is its token sum over the whole accumulated batch's tokens; the logged lm_loss must
    # still be the step's LM loss, as the Trainer's own loss log is.
    out = tmp_path / "accumulated"
    train(run_config(files, out, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["lbc_loss"], abs=1e-4), entry


def test_loramoe_output_dir_holds_adapter_run_config_state_and_results(loramoe_run, files):
    out, metrics = loramoe_run
    names = {p.name for p in out.iterdir()}
    want = {"adapter_config.json", "adapter_model.safetensors", RUN_CONFIG_NAME, "trainer_state.json",
            "train_results.json", "checkpoint-6", "checkpoint-12"}  # fmt: skip
    assert want <= names
    assert not any(n.endswith(".tmp") for n in names)
    saved = RunConfig.from_dict(json.loads((out / RUN_CONFIG_NAME).read_text()))
    assert saved.to_dict() == run_config(files, out).to_dict()
    results = json.loads((out / "train_results.json").read_text())
    assert results["data"]["examples"] == 16 and results["data"]["per_task"] == {
        "downstream": 8,
        "knowledge": 8,
    }
    assert results["train_loss"] == pytest.approx(metrics["train_loss"])
    assert latest_good_checkpoint(out) == str(out / "checkpoint-12")
    final, last = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(out / "checkpoint-12" / "adapter_model.safetensors")),
    )
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_load_trained_loramoe_adds_the_trained_experts_to_the_base(loramoe_run, files):
    out, _ = loramoe_run
    model, tokenizer = load_trained(out)  # the base is the one the adapter names
    base, _ = load_trained(None, base=str(files / "base"))
    assert not model.training and hasattr(model, "loramoe_config")
    ids = tokenizer("Say hi.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
        again, _ = load_trained(out)
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.parameters())


def test_a_run_is_reproducible_in_one_process(files, tmp_path):
    """train() seeds the adapter's initialisation itself: the global RNG state before it does not matter."""
    torch.manual_seed(123)
    train(run_config(files, tmp_path / "a", max_steps=3))
    torch.rand(100)
    train(run_config(files, tmp_path / "b", max_steps=3))
    a, b = (
        load_file(str(tmp_path / "a/adapter_model.safetensors")),
        load_file(str(tmp_path / "b/adapter_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_train_and_load(method, files, tmp_path):
    out = tmp_path / method
    train(run_config(files, out, method, max_steps=4, save_strategy="no"))
    losses = [loss for _, loss in learning_curve(out)]
    assert losses[-1] < losses[0]
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert not any("lbc_loss" in e for e in logs)  # task types are ignored by the baselines
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / weights).is_file() and (out / RUN_CONFIG_NAME).is_file()
    model, tokenizer = load_trained(out, base=str(files / "base") if method == "lora" else None)
    base, _ = load_trained(None, base=str(files / "base"))
    ids = tokenizer("Say hi.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    assert not model.training


def test_lora_baseline_rank_matches_the_loramoe_budget():
    model = tiny_model("llama")
    cfg = LoRAMoEConfig(num_experts=4, rank=2)
    rank = matched_lora_rank(model, cfg)
    # per target: LoRAMoE has N * (r * (in + out) + in); LoRA has rank * (in + out)
    shapes = [(32, 64), (32, 64), (64, 32)] * 2
    moe = sum(4 * (2 * (i + o) + i) for i, o in shapes)
    assert rank == round(moe / sum(i + o for i, o in shapes))


def test_key_value_overrides_reach_the_run(files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(run_config(files, tmp_path / "out").to_dict()))  # JSON is YAML
    overrides = ["training.max_steps=2", "loramoe.rank=3", "training.learning_rate=1e-4", "data.sources.1.ratio=0.5",
                 "data.total_samples=10", "training.save_strategy=no"]  # fmt: skip
    assert main(["train", str(config), *overrides]) == 0
    saved = json.loads((tmp_path / "out" / RUN_CONFIG_NAME).read_text())
    assert saved["loramoe"]["rank"] == 3 and saved["training"]["learning_rate"] == 1e-4
    assert saved["data"]["sources"][1]["ratio"] == 0.5
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_resume_with_a_changed_adapter_config_is_an_adapter_error(loramoe_run, files, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(loramoe_run[0], out)
    changed = run_config(files, out).to_dict()
    changed["loramoe"]["num_experts"] = 2
    with pytest.raises(ConfigError, match=r"changed config: loramoe\.num_experts: was 4, now 2"):
        train(RunConfig.from_dict(changed), resume=True)
    # without the run's config, the checkpoint's own adapter config still tells
    (out / RUN_CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match="config differs"):
        train(RunConfig.from_dict(changed), resume=True)


def test_run_config_forces_what_loramoe_needs_and_rejects_unknown_arguments(files, tmp_path):
    run = run_config(files, tmp_path, remove_unused_columns=True)
    args = run.training_arguments()
    assert args.remove_unused_columns is False and args.label_names == ["labels"]  # task_types reach the loss
    with pytest.raises(ConfigError, match=r"unknown training argument.*epochs"):
        run_config(files, tmp_path, epochs=3)
    with pytest.raises(ConfigError, match=r"training.learning_rate must be a number >= 0, got 'fast'"):
        run_config(files, tmp_path, learning_rate="fast")
    with pytest.raises(ConfigError, match=r"training.lr_scheduler_type: zigzag is not a valid"):
        run_config(files, tmp_path, lr_scheduler_type="zigzag")


def test_non_finite_parameters_are_never_saved():
    model = torch.nn.Linear(2, 2)
    check_parameters_finite(model, 3)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"after step 3 \(weight\)"):
        check_parameters_finite(model, 3)


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(loramoe_run, files):
    out, _ = loramoe_run
    with pytest.raises(
        ConfigError,
        match=r"holds checkpoints of an earlier run \(checkpoint-12, ...\); continue it with --resume",
    ):
        train(run_config(files, out))


def test_the_trainer_backpropagates_the_stock_lm_loss_plus_the_lbcs_share_of_an_optimizer_step(
    files, tmp_path, monkeypatch
):
    # The LM term is the stock Trainer's, scaled as it scales it: under DDP each process's token sum is divided by
    # the tokens of all processes and DDP averages the gradients, so the loss is multiplied by the number of
    # processes (three stand in here). The LBC is a per-process mean, and a mean over one micro-batch: with k
    # accumulated micro-batches of a token-averaged LM loss it counts 1/k per micro-batch.
    from accelerate import Accelerator
    from transformers import Trainer

    from loramoe.loss import compute_loss
    from loramoe.training.train import build_trainer

    trainer = build_trainer(run_config(files, tmp_path / "scaled"))
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = (batch["labels"][:, 1:] != -100).sum()
    model = trainer.model.train()
    assert trainer.model_accepts_loss_kwargs  # the token-averaged case
    parts = compute_loss(model, dict(batch), num_items_in_batch=tokens)
    assert parts.lbc > 0
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 3))
    trainer.args.average_tokens_across_devices = True
    plain = {k: v for k, v in batch.items() if k != "task_types"}
    stock = Trainer.compute_loss(trainer, model, plain, num_items_in_batch=tokens)
    assert stock.item() == pytest.approx(3 * parts.lm.item(), rel=1e-5)
    for steps in (1, 4):
        trainer.current_gradient_accumulation_steps = steps
        total = trainer.compute_loss(model, batch, num_items_in_batch=tokens)
        assert total.item() == pytest.approx(3 * parts.lm.item() + parts.lbc.item() / steps, rel=1e-5)
