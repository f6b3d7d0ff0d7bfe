"""The GPU recipes, dry-run on the CPU: the paper-scale run config and the shipped accelerate configs.

- examples/configs/paper_llama2_7b.yaml is parsed as ``loramoe train`` parses it and builds the same structure on a
  tiny LLaMA (same architecture class, 2 layers), which then takes one bfloat16 training step.
- The DeepSpeed configs are turned into the DeepSpeed config accelerate and the Trainer would hand to DeepSpeed,
  and validated by DeepSpeed's own schema (``deepspeed.runtime.config.DeepSpeedConfig``, pydantic models that
  refuse unknown keys). DeepSpeed cannot run here: accelerate enables it only on accelerators.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from loramoe.cli.overrides import apply_overrides
from loramoe.files import load_yaml
from loramoe.inject import adapted_modules
from loramoe.loss import compute_loss
from loramoe.training.run_config import RunConfig
from loramoe.training.train import prepare_model

from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "configs" / "paper_llama2_7b.yaml"
ACCELERATE = ROOT / "examples" / "accelerate"
# transformers refuses bf16 without a GPU unless use_cpu is set: the only change the dry run makes.
CPU_OVERRIDES = ["training.use_cpu=true"]


def recipe() -> RunConfig:
    return RunConfig.from_dict(apply_overrides(load_yaml(RECIPE), CPU_OVERRIDES))


def test_paper_recipe_parses_to_the_papers_setting():
    run = recipe()
    assert run.model == "meta-llama/Llama-2-7b-hf" and run.dtype == "bfloat16" and run.method == "loramoe"
    cfg = run.loramoe
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.dropout, cfg.dropout_mode) == (
        8,
        4,
        32,
        0.05,
        "per_expert",
    )
    assert (cfg.lbc_delta, cfg.lbc_weight, cfg.lbc_positions) == (0.1, 0.1, "non_padding")
    assert run.data.max_length == 1024
    sources = run.data.sources
    assert all(s.hf_dataset and s.path is None for s in sources)  # Hugging Face datasets by name
    assert {s.task_type for s in sources} == {"knowledge", "downstream"}
    args = run.training_arguments()
    assert args.bf16 and args.learning_rate == 2e-4 and args.num_train_epochs == 1
    assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.03
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    for launcher in ("fsdp.yaml", "deepspeed_zero3.yaml"):  # the launch lines it names exist
        assert f"examples/accelerate/{launcher}" in RECIPE.read_text() and (ACCELERATE / launcher).is_file()


def test_paper_recipe_builds_the_same_structure_on_a_tiny_llama_and_trains_a_bf16_step():
    run = recipe()
    model = prepare_model(
        tiny_model("llama").to(torch.bfloat16), run
    )  # the base as `dtype: bfloat16` loads it
    assert type(model).__name__ == "LlamaForCausalLM"
    layers = adapted_modules(model)
    per_layer = {name.rsplit(".", 1)[-1] for name in layers}
    assert per_layer == {"gate_proj", "up_proj", "down_proj"}
    assert len(layers) == 3 * model.config.num_hidden_layers
    for layer in layers.values():
        assert (layer.num_experts, layer.rank, layer.scaling) == (8, 4, 8.0)
        assert layer.dropout == 0.05 and layer.top_k is None
        assert layer.loramoe_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("loramoe_" in n for n in trainable)

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, task_types=torch.tensor([0, 1])
    )
    parts = compute_loss(model.train(), batch)
    parts.total.backward()
    assert torch.isfinite(parts.total) and parts.lbc > 0
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for n, p in model.named_parameters()
        if n in trainable
    )


def deepspeed_config_for(accelerate_yaml: Path) -> dict:
    """The DeepSpeed config that ``accelerate launch --config_file`` + the Trainer build for the paper recipe."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    launch = yaml.safe_load(accelerate_yaml.read_text())
    assert launch["distributed_type"] == "DEEPSPEED"
    ds = launch["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=ds["zero_stage"],
        gradient_accumulation_steps=ds.get("gradient_accumulation_steps", 1),
        gradient_clipping=ds.get("gradient_clipping"),
        offload_optimizer_device=ds.get("offload_optimizer_device"),
        offload_param_device=ds.get("offload_param_device"),
        zero3_init_flag=ds.get("zero3_init_flag"),
        zero3_save_16bit_model=ds.get("zero3_save_16bit_model"),
    )
    plugin.set_mixed_precision(launch["mixed_precision"])
    args = recipe().training_arguments()
    args.gradient_accumulation_steps = ds.get("gradient_accumulation_steps", 1)  # accelerate's value wins
    filled = HfTrainerDeepSpeedConfig(dict(plugin.deepspeed_config))
    filled.trainer_config_process(args)
    return filled.config


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_shipped_deepspeed_configs_pass_deepspeeds_own_schema(name: str, stage: int):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config_for(ACCELERATE / name)
    checked = DeepSpeedConfig(config)
    assert checked.zero_optimization_stage == stage
    assert checked.bfloat16_config.enabled and not checked.float16_config.enabled
    if stage == 3:  # the Trainer gathers the partitioned weights before loramoe writes the adapter
        assert checked.zero_config.gather_16bit_weights_on_model_save
    broken = {**config, "zero_optimization": {**config["zero_optimization"], "stage3_gather_weights": True}}
    with pytest.raises(Exception, match="stage3_gather_weights"):  # the schema does check: a wrong key fails
        DeepSpeedConfig(broken)
