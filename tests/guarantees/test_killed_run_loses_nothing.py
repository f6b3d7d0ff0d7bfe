"""Never lose a run: training killed with SIGKILL at random moments and resumed gives bitwise the adapter of an
uninterrupted run; torn checkpoints are skipped; a NaN loss (or an absurd learning rate) stops the run naming the
step and keeps the last good checkpoint. Shared setup: ``reliability_helpers.py``.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

import loramoe.errors as errors
from loramoe.cli import main
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from reliability_helpers import Processes, make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def processes(workspace):
    procs = Processes(workspace, workers=3, cli=False)
    yield procs
    procs.close()


def _run_config(root: Path, out: Path, **training) -> dict:
    return {
        "model": str(root / "base"),
        "loramoe": {"num_experts": 4, "rank": 2, "dropout": 0.1},
        "data": {"sources": [{"path": str(root / "good.jsonl")}], "max_length": 48},
        "training": {"output_dir": str(out), "max_steps": 40, "per_device_train_batch_size": 2, "learning_rate": 5e-3,
                     "save_steps": 3, "logging_steps": 1, "use_cpu": True, "disable_tqdm": True,
                     "dataloader_num_workers": 0, **training},
    }  # fmt: skip


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def _record_training_steps(monkeypatch) -> list[tuple[int, int]]:
    """(the Trainer's global step, the optimizer's step count) at each training forward of this process."""
    from loramoe.training.trainer import LoRAMoETrainer

    seen: list[tuple[int, int]] = []
    original = LoRAMoETrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            adam = next(iter(self.optimizer.state.values()), {})
            seen.append((self.state.global_step, int(adam["step"]) if "step" in adam else 0))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LoRAMoETrainer, "compute_loss", recording)
    return seen


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter_bitwise(
    workspace, processes, tmp_path, monkeypatch
):
    from loramoe.training.checkpoints import latest_good_checkpoint
    from loramoe.training.completion import COMPLETE_MARKER

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(workspace, out)))
    reference = tmp_path / "reference"
    train(RunConfig.from_dict(_run_config(workspace, reference)))  # the uninterrupted run
    kills = []
    for _ in range(3):
        # Kill when a random later checkpoint (1 to 3 saves on) has begun to appear, after a random delay of up to
        # 50 ms: mid-save or a step or two later, wherever it falls, on a fast machine or a loaded one.
        past = max(_checkpoint_steps(out), default=0)
        target, delay = past + 3 * rng.randint(1, 3), rng.uniform(0.0, 0.05)
        proc = processes.run(["train", str(config), "--resume"], tmp_path)
        deadline = time.monotonic() + 1200
        while max(_checkpoint_steps(out), default=0) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "training made no checkpoint"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr_path.read_text()
        kills.append((target, round(delay, 3), proc.returncode))
    print(f"seed {seed}; kills (at checkpoint step, delay s, exit code): {kills}")
    assert all(rc == -signal.SIGKILL for *_, rc in kills), kills
    # The newest checkpoint with its completion marker (a killed save has none); 3 kills always leave one.
    complete = [n for n in _checkpoint_steps(out) if (out / f"checkpoint-{n}" / COMPLETE_MARKER).is_file()]
    assert complete, f"seed {seed}, kills {kills}: no complete checkpoint"
    newest = max(complete)
    assert latest_good_checkpoint(out) == str(out / f"checkpoint-{newest}")
    steps = _record_training_steps(monkeypatch)
    assert main(["train", str(config), "--resume"]) == 0
    # It resumed from that checkpoint: a restart from step 0 ends with the same adapter (the run is
    # deterministic), so only the steps it ran tell them apart. The first step continues the checkpoint's global
    # step with the optimizer state saved there (AdamW's step count), and only the remaining steps run.
    assert steps, "the resumed run ran no training step"
    assert steps[0] == (newest, newest), (
        f"seed {seed}, kills {kills}: the resumed run started at (global step, optimizer step) {steps[0]}, not "
        f"at checkpoint-{newest}'s ({newest}, {newest})"
    )
    assert [s for s, _ in steps] == list(range(newest, 40))
    want, got = _adapter(reference), _adapter(out)
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, (
        f"seed {seed}, kills (after step, delay, rc) {kills}: {len(differ)} tensors differ: {differ[0]}"
    )


def test_torn_checkpoints_are_skipped_and_the_previous_good_one_is_used(workspace, tmp_path, caplog):
    from loramoe.training.checkpoints import latest_good_checkpoint
    from loramoe.training.completion import COMPLETE_MARKER, SAVING_MARKER

    out = tmp_path / "run"
    train(RunConfig.from_dict(_run_config(workspace, out, max_steps=9)))
    assert _checkpoint_steps(out) == [3, 6, 9]
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")
    (
        out / "checkpoint-9" / COMPLETE_MARKER
    ).unlink()  # killed before the marker: the saving marker is still there
    (out / "checkpoint-9" / SAVING_MARKER).touch()
    weights = out / "checkpoint-6" / "adapter_model.safetensors"  # torn after the marker
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="loramoe.train"):
        assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    assert f"skipping {out / 'checkpoint-9'} (no {COMPLETE_MARKER}: its save did not finish)" in caplog.text
    assert (
        f"skipping {out / 'checkpoint-6'} (adapter_model.safetensors differs from the checksum" in caplog.text
    )
    # the resumed run starts at step 3, removes its unfinished save, sets the damaged one aside (kept as it is) and
    # writes good ones in their place
    train(RunConfig.from_dict(_run_config(workspace, out, max_steps=9)), resume=True)
    assert (out / "checkpoint-6.failed-verification" / "adapter_model.safetensors").stat().st_size == 100
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 10))  # none redone
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    import loramoe.training.train as train_module
    from loramoe.training.checkpoints import latest_good_checkpoint

    prepare = train_module.prepare_model
    calls = {"n": 0}

    def poisoned(model, run):  # the 5th training forward returns a NaN loss
        model = prepare(model, run)

        def hook(module, args, output):
            calls["n"] += module.training
            if calls["n"] == 5:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "prepare_model", poisoned)
    out = tmp_path / "run"
    with pytest.raises(errors.TrainingError, match=r"loss is nan at step 5.*checkpoint-3"):
        train(RunConfig.from_dict(_run_config(workspace, out, max_steps=10)))
    assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a failed run


def test_absurd_learning_rate_exits_2_naming_the_step(workspace, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(_run_config(workspace, tmp_path / "run", learning_rate=1e30, save_steps=1))
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"loramoe train: error: .*(loss is (nan|inf)|NaN or infinite).* step \d+", err), err
