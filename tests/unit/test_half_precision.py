"""Half precision on a tiny model: a bfloat16 base with float32 adapters, and bfloat16 autocast over float32.

Both are compared with the float32 model that has the same (bfloat16-rounded) base weights and the same adapter,
so the differences come from bfloat16 activations only. Tolerances, about 3x what was measured on this CPU:

| quantity | measured (bf16 base / autocast) | allowed |
|---|---|---|
| LM loss, relative | 4e-5 / 1e-5 | 1e-3 |
| LBC, relative | 1.2e-3 / 1.0e-3 | 1e-2 |
| logits, absolute (logits up to 0.5) | 0.010 / 0.009 | 0.03 |
| router probabilities, absolute | 0.0023 / 0.0048 | 0.015 |
| adapter gradients, relative norm of the error | 0.024 / 0.034 | 0.1 |

The router's softmax stays float32, and the adapter parameters and their gradients stay float32, in both.
(bfloat16 matmuls are 20-90x slower than float32 on this CPU, hence the tiny model.)
"""

from __future__ import annotations

import pytest
import torch

from loramoe import LoRAMoEConfig, inject
from loramoe.adapter import load_adapter, save_adapter
from loramoe.loss import compute_loss
from loramoe.models.base import load_base

from tiny import tiny_model, tiny_tokenizer

CFG = LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0, lbc_weight=0.1, lbc_delta=0.1)
IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
BATCH = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS, task_types=torch.tensor([0, 1]))


def adapted(base_dtype: torch.dtype) -> torch.nn.Module:
    """The tiny llama with bfloat16-rounded base weights in ``base_dtype``, and the same float32 adapter."""
    model = inject(tiny_model("llama").to(torch.bfloat16).to(base_dtype), CFG)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking B (zero B would leave the routers without gradient)
        for name, p in model.named_parameters():
            if name.endswith("loramoe_B"):
                p.normal_(std=0.1)
    return model.train()


def step(model: torch.nn.Module, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        parts = compute_loss(model, BATCH, record=True)
    parts.total.backward()
    return parts, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return step(adapted(torch.float32))


@pytest.mark.parametrize("mode", ["bf16_base", "autocast"])
def test_half_precision_step_matches_float32_within_stated_tolerances(reference, mode):
    ref, ref_grads = reference
    model = adapted(torch.bfloat16 if mode == "bf16_base" else torch.float32)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "loramoe_" in n)
    parts, grads = step(model, autocast=mode == "autocast")

    assert parts.outputs.logits.dtype == torch.bfloat16
    torch.testing.assert_close(parts.lm.float(), ref.lm, rtol=1e-3, atol=0)
    torch.testing.assert_close(parts.lbc, ref.lbc, rtol=1e-2, atol=0)
    torch.testing.assert_close(parts.outputs.logits.float(), ref.outputs.logits, rtol=0, atol=0.03)
    assert parts.router_probs.keys() == ref.router_probs.keys()
    for name, probs in parts.router_probs.items():
        assert probs.dtype == torch.float32, name  # the router softmax stays float32
        torch.testing.assert_close(probs, ref.router_probs[name], rtol=0, atol=0.015)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert float((grad - ref_grads[name]).norm() / ref_grads[name].norm()) < 0.1, name


def test_bf16_base_adapter_saves_float32_and_reloads_to_identical_outputs(tmp_path):
    from safetensors.torch import load_file

    base_dir = tmp_path / "base"  # the base loaded as a run config's `dtype: bfloat16` loads it
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = inject(load_base(str(base_dir), dtype="bfloat16", device="cpu")[0], CFG).eval()
    assert {p.dtype for n, p in model.named_parameters() if "loramoe_" not in n} == {torch.bfloat16}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("loramoe_B"):
                p.normal_(std=0.1)
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    reloaded = load_adapter(load_base(str(base_dir), dtype="bfloat16", device="cpu")[0], tmp_path / "adapter")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        got = reloaded.eval()(input_ids=IDS).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
