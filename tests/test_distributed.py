"""Two real processes on the CPU (gloo): torchrun and accelerate launch train the same adapter on every rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loramoe

from tiny import tiny_model, tiny_tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
BIN = Path(sys.executable).parent


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(32):
            f.write(
                json.dumps({"question": f"What is {i} plus one?", "answer": str(i + 1), "task_type": i % 2})
                + "\n"
            )
    (tmp_path / "cfg.yaml").write_text(
        f"model: {base}\n"
        "loramoe: {num_experts: 4, rank: 2}\n"
        f"data: {{max_length: 64, sources: [{{path: {tmp_path / 'data.jsonl'}}}]}}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, per_device_train_batch_size: 4, max_steps: 4,"
        " learning_rate: 1.0e-2, use_cpu: true, save_steps: 2, logging_steps: 1}\n"
    )
    return tmp_path


LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_agree_and_the_saved_adapter_loads(run_dir: Path, launcher: str) -> None:
    if shutil.which(LAUNCHERS[launcher][0]) is None:
        pytest.fail(f"{LAUNCHERS[launcher][0]} is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*LAUNCHERS[launcher], str(SCRIPT), str(run_dir / "cfg.yaml"), str(run_dir / "dump")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2 done, steps 4" in proc.stdout and "rank 1/2 done, steps 4" in proc.stdout

    rank0 = load_file(str(run_dir / "dump.rank0.safetensors"))
    rank1 = load_file(str(run_dir / "dump.rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # DDP averages gradients: every rank holds the same weights
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(bool(t.abs().sum() > 0) for k, t in rank0.items() if k.endswith("lora_B"))  # it trained

    model = loramoe.load_adapter(tiny_model("llama"), run_dir / "out")
    saved = load_file(str(run_dir / "out" / "adapter_model.safetensors"))
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, rank0[key], rtol=0, atol=0)
    state = json.loads((run_dir / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert len(loramoe.adapted_modules(model)) == 6
