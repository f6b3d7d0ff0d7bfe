"""Two real processes on the CPU (gloo): DDP through torchrun and accelerate launch, and FSDP2 (fully_shard)."""

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
from loramoe.training.checkpoints import OWNER_MARKER, latest_good_checkpoint
from loramoe.training.completion import COMPLETE_MARKER

from tiny import tiny_model, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_train.py"
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
    # the completion marker is written after every process wrote its files, and the checkpoint is this run's
    marked = json.loads((run_dir / "out" / "checkpoint-4" / COMPLETE_MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", OWNER_MARKER} <= set(marked)
    assert latest_good_checkpoint(run_dir / "out") == str(run_dir / "out" / "checkpoint-4")


FSDP_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fsdp_train.py"
ROOT = Path(__file__).resolve().parents[2]


def test_fsdp2_two_processes_match_one_process_and_save_a_whole_adapter(tmp_path: Path) -> None:
    # torch's FSDP2 (fully_shard) with gloo: 2 ranks, each one micro-batch of every global batch, against one
    # process that runs both micro-batches of every step. The adapter is saved from the sharded parameters
    # with save_sharded_adapter called on every rank, and loaded back into freshly sharded parameters.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", str(FSDP_SCRIPT), str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(FSDP_SCRIPT), str(tmp_path / "one")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    sharded = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    single = json.loads((tmp_path / "one" / "losses.json").read_text())
    assert len(sharded) == 4 and sharded[-1] < sharded[0]
    # Same data and order; FSDP's gradient average and the single process's mean of two losses round alike
    # here (measured: bit-identical), so the tolerance only allows for another summation order.
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(single), rtol=1e-5, atol=1e-6)
    for name in ("step2", "final"):
        model = loramoe.load_adapter(tiny_model("llama"), tmp_path / "fsdp" / name)  # loads on one process
        assert len(loramoe.adapted_modules(model)) == 6
        got = load_file(str(tmp_path / "fsdp" / name / "adapter_model.safetensors"))
        want = load_file(str(tmp_path / "one" / name / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not list((tmp_path / "fsdp").glob("*/*.tmp*"))  # rank 1 wrote nothing, not even a temporary file
    for rank in (0, 1):  # the saved file, loaded into sharded parameters, is what every rank holds
        assert (
            json.loads((tmp_path / "fsdp" / f"reloaded.rank{rank}.json").read_text())["max_abs_diff"] == 0.0
        )


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_a_sharding_config_that_accelerate_replaces_on_the_cpu_is_refused(monkeypatch, engine: str) -> None:
    from accelerate import DistributedType

    from loramoe.errors import ConfigError
    from loramoe.training.train import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(ConfigError, match=f"asks for {engine}.*runs this job as MULTI_CPU.*never on the CPU"):
        check_launch(DistributedType.MULTI_CPU)
    check_launch(DistributedType[engine])  # what it asked for: accepted
    monkeypatch.delenv(f"ACCELERATE_USE_{engine}")
    with pytest.raises(ConfigError, match="connected none of them.*use_cpu: true"):
        check_launch(DistributedType.NO)


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_fsdp_config_names_why_it_cannot_shard_on_the_cpu(run_dir: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", str(SCRIPT), str(run_dir / "cfg.yaml"),
           str(run_dir / "dump")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asks for FSDP, but accelerate runs this job as MULTI_CPU" in proc.stderr
    assert not (run_dir / "out" / "adapter_model.safetensors").exists()


def test_a_locked_output_directory_stops_every_rank_with_the_lock_error(run_dir: Path) -> None:
    # Only rank 0 takes the lock; the other rank learns the outcome and stops with the same error, instead of
    # going on alone and waiting forever for rank 0 in the next collective.
    from loramoe.dirlock import DirectoryLock

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "loramoe", "train", str(run_dir / "cfg.yaml")]  # fmt: skip
    with DirectoryLock(run_dir / "out"):  # another process (this one) is writing there
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "loramoe train: error:" in line]
    assert len(lines) == 2, proc.stderr[-3000:]
    busy = f"is in use by another loramoe process (pid {os.getpid()} on "
    assert all(busy in line for line in lines), lines
    assert sorted(p.name for p in (run_dir / "out").iterdir()) == [".loramoe.lock"]  # nothing else written
