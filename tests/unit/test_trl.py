"""TRL's own ``SFTTrainer`` training LoRAMoE (``loramoe.training.trl``): the loss equals loramoe's trainer's on the
same batch, the LBC trains from the dataset's task type column, router statistics reach TRL's logs, and the output
is a loramoe adapter. Also the README's TRL example, run as a script on a tiny model.

Tolerance of the loss equality: TRL computes the LM term with its fused LM head (log-probabilities of the label
tokens, summed, over their count); loramoe's trainer uses the model's own cross-entropy. Both are float32 sums of
the same values in another order: 1e-5 relative.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from loramoe import LoRAMoEConfig, adapted_modules, compute_loss, inject, load_adapter
from loramoe.errors import ConfigError, DataError
from loramoe.training.trainer import LoRAMoETrainer

from tiny import tiny_model, tiny_tokenizer

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'loramoe[trl]')")
from trl import SFTConfig  # noqa: E402

from loramoe.training.trl import LoRAMoESFTTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [
    {"prompt": "Say hi. ", "completion": "hi", "task_type": "downstream"},
    {"prompt": "Say bye. ", "completion": "bye", "task_type": "downstream"},
    {"prompt": "Capital of France? ", "completion": "Paris", "task_type": "knowledge"},
    {"prompt": "Capital of Peru? ", "completion": "Lima", "task_type": "knowledge"},
]


def adapted(seed: int = 0):
    torch.manual_seed(seed)
    return inject(tiny_model("llama"), LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0, lbc_weight=0.5))


def sft_config(out: Path, **overrides) -> SFTConfig:
    settings = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                    disable_tqdm=True, max_length=48)  # fmt: skip
    return SFTConfig(**{**settings, **overrides})


def sft_trainer(
    out: Path, model=None, records=RECORDS * 2, special_tokens_in_text="warn", **overrides
) -> LoRAMoESFTTrainer:
    return LoRAMoESFTTrainer(
        model=model if model is not None else adapted(),
        args=sft_config(out, **overrides),
        train_dataset=records
        if isinstance(records, datasets.IterableDataset)
        else datasets.Dataset.from_list(records),
        processing_class=tiny_tokenizer(),
        special_tokens_in_text=special_tokens_in_text,
    )


def test_sft_loss_equals_loramoe_trainer_loss_on_the_same_batch(tmp_path):
    trainer = sft_trainer(tmp_path / "sft")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task_types"].tolist() != [batch["task_types"][0].item()] * 4  # both types in the batch
    model = trainer.model.train()
    sft = trainer.compute_loss(model, dict(batch))
    args = TrainingArguments(
        str(tmp_path / "own"), remove_unused_columns=False, report_to="none", use_cpu=True
    )
    own = LoRAMoETrainer(model=model, args=args).compute_loss(model, dict(batch))
    parts = compute_loss(model, dict(batch))
    assert parts.lbc > 0
    torch.testing.assert_close(sft, own, rtol=1e-5, atol=0)
    torch.testing.assert_close(sft, parts.total, rtol=1e-5, atol=0)


def test_sft_trains_with_the_lbc_logs_router_stats_and_saves_a_loramoe_adapter(tmp_path):
    trainer = sft_trainer(tmp_path / "sft")
    routers = {n: m.loramoe_router.detach().clone() for n, m in adapted_modules(trainer.model).items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 10
    assert sum(e["loss"] for e in logs[-3:]) < sum(e["loss"] for e in logs[:3]) - 0.3
    assert all(e["lbc_loss"] > 0 for e in logs)
    logged = set().union(*logs)  # a log holds the types of the samples since the last one
    for name in ("downstream", "knowledge"):
        assert {f"router/{name}/mass_downstream", f"router/{name}/entropy"} <= logged
    assert "mean_token_accuracy" in logs[-1]  # TRL's own metrics are still there
    assert any(
        not torch.equal(routers[n], m.loramoe_router) for n, m in adapted_modules(trainer.model).items()
    )
    assert all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters() if "loramoe_" in n)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["format"] == "loramoe"
    ids = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 11]])
    trained = trainer.model.eval()
    reloaded = load_adapter(tiny_model("llama"), out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_sft_refuses_what_would_lose_the_task_types(tmp_path):
    with pytest.raises(ConfigError, match="packing"):
        sft_trainer(tmp_path, packing=True)
    with pytest.raises(ConfigError, match="needs a model with LoRAMoE layers"):
        sft_trainer(tmp_path, model=tiny_model("llama"))
    with pytest.raises(ConfigError, match="no 'task_type' column"):
        sft_trainer(tmp_path, records=[{k: v for k, v in r.items() if k != "task_type"} for r in RECORDS])
    trainer = sft_trainer(tmp_path, records=[{**r, "task_type": "poetry"} for r in RECORDS])
    with pytest.raises(DataError, match="unknown task type 'poetry'"):
        next(iter(trainer.get_train_dataloader()))


QUOTED = {
    "prompt": "How does ChatML end a turn? ",
    "completion": "With <|im_end|> after it.",
    "task_type": "downstream",
}


def test_sft_counts_and_warns_about_special_tokens_written_as_text(tmp_path, caplog):
    """``<|im_end|>`` quoted in a completion is tokenised by TRL as the end-of-turn token: the rows are counted per
    dataset and a warning names the first, as the dataset indexes it; the row is still trained as TRL reads it."""
    caplog.set_level("WARNING", logger="loramoe.data")
    chat = [
        {"role": "user", "content": "Quote the end."},
        {"role": "assistant", "content": "It is <|im_end|>."},
    ]
    trainer = LoRAMoESFTTrainer(
        model=adapted(),
        args=sft_config(tmp_path),
        train_dataset=datasets.Dataset.from_list([RECORDS[0], QUOTED, *RECORDS[1:]]),
        eval_dataset={"chat": datasets.Dataset.from_list([{"messages": chat, "task_type": "knowledge"}] * 2)},
        processing_class=tiny_tokenizer(),
    )
    assert trainer.special_token_rows == {"train_dataset": 1, "eval_dataset['chat']": 2}
    warned = [r.getMessage() for r in caplog.records if "special token" in r.getMessage()]
    assert len(warned) == 2
    assert "1 rows of train_dataset hold a special token" in warned[0]
    assert "the first: train_dataset[1]['completion'] '<|im_end|>'" in warned[0]
    assert "the first: eval_dataset['chat'][0]['messages'][1]['content'] '<|im_end|>'" in warned[1]
    eos = tiny_tokenizer().eos_token_id
    assert trainer.train_dataset[1]["input_ids"].count(eos) == 2  # the quoted one and the real end


def test_sft_refuses_a_special_token_written_as_text_naming_the_row(tmp_path):
    records = [RECORDS[0], QUOTED, *RECORDS[1:]]
    with pytest.raises(DataError) as refused:
        sft_trainer(tmp_path, records=records, special_tokens_in_text="refuse")
    assert str(refused.value).startswith(
        "train_dataset[1]['completion'] holds '<|im_end|>', a special token of the tokenizer, written as text"
    )
    assert "special_tokens_in_text='allow'" in str(refused.value)
    with pytest.raises(ConfigError, match="special_tokens_in_text must be one of"):
        sft_trainer(tmp_path, special_tokens_in_text="ignore")


def test_sft_checks_a_streamed_dataset_as_its_rows_are_read(tmp_path, caplog):
    """A streamed dataset is not read ahead: its rows are checked as training reads them; the warning is given
    once, naming the first row."""
    caplog.set_level("WARNING", logger="loramoe.data")
    streamed = datasets.Dataset.from_list([RECORDS[0], QUOTED, *RECORDS[1:], QUOTED]).to_iterable_dataset()
    trainer = sft_trainer(tmp_path, records=streamed)
    next(iter(trainer.get_train_dataloader()))
    warned = [r.getMessage() for r in caplog.records if "special token" in r.getMessage()]
    assert len(warned) == 1 and "rows of the streamed train_dataset hold a special token" in warned[0]
    assert "the first: train_dataset[1]['completion'] '<|im_end|>'" in warned[0]
    assert trainer.special_token_rows == {}  # no count: the stream is not read whole

    refusing = sft_trainer(tmp_path, records=streamed, special_tokens_in_text="refuse")
    with pytest.raises(DataError, match=r"^train_dataset\[1\]\['completion'\] holds '<\|im_end\|>'"):
        next(iter(refusing.get_train_dataloader()))


def test_sft_allows_special_tokens_written_as_text_silently(tmp_path, caplog):
    caplog.set_level("WARNING", logger="loramoe.data")
    trainer = sft_trainer(
        tmp_path, records=[RECORDS[0], QUOTED, *RECORDS[1:]], special_tokens_in_text="allow"
    )
    assert trainer.special_token_rows == {"train_dataset": 1}  # counted, not warned
    assert not any("special token" in r.getMessage() for r in caplog.records)
    quiet = sft_trainer(tmp_path, records=RECORDS)
    assert quiet.special_token_rows == {"train_dataset": 0}


def readme_example() -> str:
    block = re.search(r"<!-- trl-example -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no TRL example block"
    return block.group(1)


def test_readme_trl_example_runs(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    script = tmp_path / "example.py"
    code = readme_example().replace('"smollm2-135m-instruct"', repr(str(base)))
    code = code.replace('output_dir="outputs/trl-sft"', f"output_dir={str(tmp_path / 'out')!r}, use_cpu=True")
    script.write_text(code)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
    }  # this checkout's loramoe, as the other tests import
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["format"] == "loramoe"
    lbc = [float(v) for v in re.findall(r"'lbc_loss': '([^']+)'", done.stdout)]
    assert len(lbc) == 4 and all(math.isfinite(v) and v > 0 for v in lbc)
