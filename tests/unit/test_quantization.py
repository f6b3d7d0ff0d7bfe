"""Quantized bases (bitsandbytes on the CPU): LoRAMoE wraps 4- and 8-bit linears with float32 experts, a 4-bit run
trains with the loss falling, its adapter reloads onto a 4-bit and a float32 base, and generate / serve run on it.

Tolerances. Reloading onto the same 4-bit base must give the trained model's logits to float32 rounding: the
quantized weights are a deterministic function of the float weights. Onto a float32 base, the logits differ by the
base's own NF4 error, which no adapter removes; measured as a relative L2 error ``rel(a, b) = |a - b| / |b|``, the
adapted models may differ by at most 1.5 times what the bare bases differ by (measured: 0.12 against 0.11), and
the adapter's own effect (adapted minus base) by at most twice that base error (measured: 0.14), while the effect
itself is ten times larger than the quantization error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from loramoe import LoRAMoEConfig, adapted_modules, compute_loss, inject
from loramoe.cli import main
from loramoe.errors import ConfigError
from loramoe.inference.generate import generate
from loramoe.models.base import load_base
from loramoe.models.quantization import adapters_attached, is_quantized, prepare_for_training
from loramoe.models.trained import load_trained
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train
from loramoe.training.trainer import LoRAMoETrainer
from test_train import learning_curve, run_config

from serve_helpers import chat, running
from tiny import tiny_model, tiny_tokenizer

pytest.importorskip(
    "bitsandbytes", reason="the quantized path needs bitsandbytes (pip install 'loramoe[quant]')"
)

RECORDS = [
    {"instruction": "Say hi.", "output": "hi", "task_type": 0},
    {"instruction": "Say bye.", "output": "bye", "task_type": 0},
    {"question": "Capital of France?", "answer": "Paris", "task_type": 1},
    {"question": "Capital of Peru?", "answer": "Lima", "task_type": 1},
]
IDS = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 11], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B, T)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    # hidden 64 / FFN 128: every linear spans whole 64-value NF4 blocks
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2] * 4))
    (root / "qa.json").write_text(json.dumps(RECORDS[2:] * 4))
    return root


@pytest.fixture(scope="module")
def run_4bit(files) -> tuple[Path, dict]:
    out = files / "run4"
    run = run_config(files, out, save_steps=12)
    run.quantization = "4bit"
    return out, train(run)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_4bit_base_is_wrapped_with_float32_experts_of_the_logical_shape(files):
    model, _ = load_base(str(files / "base"), quantization="4bit")
    assert is_quantized(model)
    inject(model, LoRAMoEConfig(num_experts=4, rank=2))
    layers = adapted_modules(model)
    assert len(layers) == 6  # gate, up, down of 2 layers
    for name, layer in layers.items():
        assert type(layer.base_layer).__name__ == "Linear4bit", name
        d, o = (
            (128, 64) if name.endswith("down_proj") else (64, 128)
        )  # logical, not the packed (D*O/2, 1) storage
        assert (layer.in_features, layer.out_features) == (d, o)
        assert layer.loramoe_A.shape == (4, 2, d) and layer.loramoe_B.shape == (4, o, 2)
        assert {p.dtype for n, p in layer.named_parameters() if n.startswith("loramoe_")} == {torch.float32}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".loramoe_" in n
    }


def test_8bit_base_trains_experts_and_routers_with_the_lbc(files):
    model, _ = load_base(str(files / "base"), quantization="8bit")
    inject(model, LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0, lbc_weight=1.0)).train()
    assert {type(m.base_layer).__name__ for m in adapted_modules(model).values()} == {"Linear8bitLt"}
    parts = compute_loss(model, {"input_ids": IDS, "labels": IDS, "task_types": torch.tensor([0, 1])})
    parts.total.backward()
    assert parts.lbc > 0
    for layer in adapted_modules(model).values():
        assert (
            layer.loramoe_B.grad.abs().sum() > 0 and layer.loramoe_router.grad.abs().sum() > 0
        )  # A: B is zero


def test_bfloat16_compute_keeps_norms_and_loss_in_float32_for_training(files):
    model, _ = load_base(str(files / "base"), quantization="4bit", dtype="bfloat16")
    assert model.model.norm.weight.dtype == torch.bfloat16
    prepare_for_training(model)
    inject(model, LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0)).train()
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    layer = next(iter(adapted_modules(model).values()))
    assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.uint8
    # As the Trainer enables it: non-reentrant checkpointing, whose input gradients transformers turns on.
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model.model.embed_tokens(IDS).requires_grad
    parts = compute_loss(model, {"input_ids": IDS, "labels": IDS, "task_types": torch.tensor([0, 1])})
    assert parts.lm.dtype == torch.float32
    parts.total.backward()
    assert all(m.loramoe_router.grad.abs().sum() > 0 for m in adapted_modules(model).values())


def test_stock_trainer_refuses_a_quantized_model_that_loramoe_trainer_accepts(files, tmp_path):
    # The contract adapters_attached relies on: transformers checks for PEFT adapters by this flag alone.
    model, _ = load_base(str(files / "base"), quantization="4bit")
    inject(model, LoRAMoEConfig(num_experts=2, rank=2))
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args)
    LoRAMoETrainer(model=model, args=args)
    with adapters_attached(model):
        Trainer(model=model, args=args)
    assert "_hf_peft_config_loaded" not in vars(model)  # nothing left behind


def test_4bit_run_trains_with_the_loss_falling(run_4bit):
    out, _ = run_4bit
    losses = [loss for _, loss in learning_curve(out)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert json.loads((out / "loramoe_run.json").read_text())["quantization"] == "4bit"
    assert (out / "adapter_model.safetensors").is_file()


def test_4bit_adapter_reloads_onto_4bit_and_float32_bases(files, run_4bit):
    out, _ = run_4bit
    base4, _ = load_base(str(files / "base"), quantization="4bit")
    base32, _ = load_base(str(files / "base"))
    adapted4, _ = load_trained(out, quantization="4bit")
    adapted32, _ = load_trained(out)
    assert is_quantized(adapted4) and not is_quantized(adapted32)
    # The same 4-bit base twice: identical to rounding.
    torch.testing.assert_close(logits(base4), logits(load_base(str(files / "base"), quantization="4bit")[0]))
    b4, b32, a4, a32 = logits(base4), logits(base32), logits(adapted4), logits(adapted32)
    base_error = rel(b4, b32)
    assert rel(a32, b32) > 5 * base_error  # the adapter does something the checks below could miss
    assert rel(a4, a32) <= 1.5 * base_error
    assert rel(a4 - b4, a32 - b32) <= 2 * base_error


def test_generate_cli_on_a_4bit_base_matches_the_library(run_4bit, capsys):
    out, _ = run_4bit
    model, tokenizer = load_trained(out, quantization="4bit")
    expected = generate(model, tokenizer, ["Say hi."], max_new_tokens=6, progress=False)
    rc = main(["generate", "--adapter", str(out), "--quantization", "4bit", "--prompt", "Say hi.",
               "--max-new-tokens", "6", "--jsonl"])  # fmt: skip
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == expected[0]


def test_serve_answers_a_real_http_request_on_a_4bit_base(run_4bit):
    out, _ = run_4bit
    model, tokenizer = load_trained(out, quantization="4bit")
    expected = generate(model, tokenizer, ["Say hi."], max_new_tokens=6, progress=False)
    with running(out, quantization="4bit") as server:
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "temperature": 0}
        response = chat(server.url, body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected[0]


def test_quantization_config_is_validated(files, tmp_path):
    with pytest.raises(ConfigError, match=r"quantization must be one of \['4bit', '8bit'\] or null"):
        RunConfig.from_dict({**run_config(files, tmp_path / "a").to_dict(), "quantization": "3bit"})
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned"):
        RunConfig.from_dict(
            {**run_config(files, tmp_path / "b").to_dict(), "method": "full", "quantization": "4bit"}
        )


def test_quantized_base_without_bitsandbytes_names_the_extra(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it imports
    with pytest.raises(ConfigError, match=r"pip install 'loramoe\[quant\]'"):
        load_base(str(files / "base"), quantization="4bit")
