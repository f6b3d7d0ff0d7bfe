"""Guarantee 6 of docs/reliability.md: generate / chat / routing and the library entry points fail with
``loramoe.errors`` types.

Undecodable prompts and zero batch sizes are clear errors, a source ratio that rounds to zero samples is named,
and library misuse raises loramoe errors. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramoe.adapter import save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, DataError
from loramoe.inject import inject
from loramoe.loss import compute_loss
from loramoe.models.base import load_base
from loramoe.routing import RouterRecorder

from guarantees_helpers import batch, cli_error, make_root
from tiny import tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


def test_undecodable_prompts_and_zero_batch_sizes_are_clear_errors(root, capsys):
    from loramoe.analysis.report import expert_usage
    from loramoe.data.formats import Example
    from loramoe.inference.chat import chat_loop
    from loramoe.inference.generate import generate

    model, tok = load_base(str(root / "base"))
    with pytest.raises(ConfigError, match=r"prompt 0 holds bytes that are not UTF-8"):
        generate(model, tok, ["caf\udce9"], progress=False)
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        generate(model, tok, ["hi"], batch_size=0, progress=False)
    with pytest.raises(ConfigError, match=r"prompts must be a list of strings"):
        generate(model, tok, "hi", progress=False)
    line = cli_error(capsys, ["generate", "--model", str(root / "base"), "--prompt", "caf\udce9"])
    assert "not UTF-8" in line
    inject(model, LoRAMoEConfig(num_experts=2, rank=2))
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        expert_usage(model, tok, [Example("a", "b", 0)], batch_size=0, progress=False)
    printed = []
    inputs = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "caf\udce9", EOFError()])

    def read(_prompt):
        item = next(inputs)
        if isinstance(item, BaseException):
            raise item
        return item

    chat_loop(
        model,
        tok,
        max_new_tokens=2,
        input_fn=read,
        print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))),
    )
    assert any("not valid utf-8 text; not sent" in p for p in printed), printed
    assert any("not UTF-8 text" in p and "not sent" in p for p in printed), printed


def test_a_ratio_that_rounds_to_zero_samples_is_named(root, tmp_path):
    from loramoe.data.sources import DataConfig, load_examples, mix_examples

    data = DataConfig.from_dict({"sources": [{"path": str(root / "good.jsonl"), "ratio": 0.9, "name": "big"},
                                             {"path": str(root / "good.jsonl"), "ratio": 0.004, "name": "tiny"}],
                                 "total_samples": 100})  # fmt: skip
    groups = [load_examples(s) for s in data.sources]
    with pytest.raises(
        ConfigError, match=r"source 'tiny': ratio 0.004 of total_samples 100 rounds to 0 samples"
    ):
        mix_examples(groups, data)


def test_library_misuse_raises_loramoe_errors(tmp_path):
    plain = tiny_model("llama")
    with pytest.raises(AdapterError, match="no LoRAMoE layers"), RouterRecorder(plain):
        pass
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(DataError, match="the batch is empty"):
        compute_loss(model, {**batch(B=0), "task_types": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(ConfigError, match="no LoRAMoE adapter"):
        save_adapter(plain, tmp_path / "out")


def test_an_empty_expert_selection_is_an_error_not_every_expert_on(root, capsys):
    """``--experts-off ""`` selects no expert: refused before the model loads, instead of analysing with all on."""
    argv = ["routing", "--adapter", str(root / "missing"), "--data", f"t={root / 'good.jsonl'}", "--out", "o"]
    line = cli_error(capsys, [*argv, "--experts-off", ""])
    assert "experts_off is empty" in line, line
    line = cli_error(capsys, [*argv, "--experts-off", " , "])
    assert "has an empty item" in line, line
