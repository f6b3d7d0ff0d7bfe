"""Guarantee 1 of docs/reliability.md, between processes: one writer per output directory at a time.

Real ``loramoe train`` processes (warm workers, ``reliability_helpers.Processes``) on a tiny model: two started
together on a new directory (held still once one has claimed it, so the other meets the claim), a second train or resume while the first is alive (held still with SIGSTOP right after
its claim, before its first checkpoint), and a resume after the holder was SIGKILLed. Whatever the other process
did, the run that holds the directory ends with the adapter it would have written alone, bitwise.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loramoe.cli import main
from loramoe.config import LoRAMoEConfig
from loramoe.dirlock import LOCK_FILE, read_holder
from loramoe.errors import AdapterError, ConfigError
from loramoe.training.checkpoints import OWNER_MARKER
from loramoe.training.completion import COMPLETE_MARKER
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import cli_error, config, make_root, tree
from reliability_helpers import Processes
from tiny import tiny_model

STEPS = {"max_steps": 12, "save_steps": 3}
BUSY = "is in use by another loramoe process (pid {pid} on "


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


@pytest.fixture(scope="module")
def processes(root):
    procs = Processes(root, workers=4, cli=False)
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def alone(root) -> dict[str, torch.Tensor]:
    """The adapter the run writes when nothing else touches its directory."""
    out = root / "alone"
    train(RunConfig.from_dict(config(root, out, **STEPS)))
    return load_file(str(out / "adapter_model.safetensors"))


def _config_file(root: Path, tmp_path: Path, out: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(root, out, **STEPS)))
    return path


def _assert_same_adapter(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    assert not [k for k in want if not torch.equal(got[k], want[k])]


def _wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr_path.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


def _error_line(proc) -> str:
    err = proc.stderr_path.read_text()
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("loramoe ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_two_trains_started_together_on_a_new_directory_one_runs_the_other_exits_2(
    root, processes, alone, tmp_path
):
    out = tmp_path / "new"
    cfg = _config_file(root, tmp_path, out)
    both = [processes.run(["train", str(cfg)], tmp_path) for _ in range(2)]
    # Whichever claims the directory first, the other must meet it still held, however the scheduler runs them
    # (on busy cores one could otherwise finish before the other starts): once the claim is made, both are held
    # still, and the other goes on alone to its end before the holder goes on.
    deadline = time.monotonic() + 300
    while not (out / OWNER_MARKER).exists():
        assert all(p.poll() is None for p in both), [p.stderr_path.read_text()[-2000:] for p in both]
        assert time.monotonic() < deadline, "neither process claimed the directory"
        time.sleep(0.002)
    for proc in both:
        os.kill(proc.pid, signal.SIGSTOP)
    assert not list(out.glob("checkpoint-*")), "the claiming run got to a checkpoint before it was held"
    holder = read_holder(out).get("pid")
    assert holder in (both[0].pid, both[1].pid), holder
    winner, loser = both if holder == both[0].pid else both[::-1]
    os.kill(loser.pid, signal.SIGCONT)
    assert loser.wait(timeout=300) == 2, loser.stderr_path.read_text()[-2000:]
    os.kill(winner.pid, signal.SIGCONT)
    assert winner.wait(timeout=300) == 0, winner.stderr_path.read_text()[-2000:]
    line = _error_line(loser)
    assert BUSY.format(pid=winner.pid) in line and str(out) in line, line
    assert "Wait for it to finish, or choose another output directory" in line
    _assert_same_adapter(out, alone)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (12, 3, 6, 9)]


def test_a_second_train_resume_or_save_while_the_first_is_alive_is_refused(
    root, processes, alone, tmp_path, capsys
):
    from loramoe.adapter import save_adapter
    from loramoe.inject import inject

    out = tmp_path / "busy"
    cfg = _config_file(root, tmp_path, out)
    first = processes.run(["train", str(cfg)], tmp_path)
    _wait_for(out / OWNER_MARKER, first)
    os.kill(first.pid, signal.SIGSTOP)  # claimed, still loading: held still so the checks below meet it there
    try:
        assert not list(out.glob("checkpoint-*")), "the first run got to a checkpoint before it was held"
        before = tree(out)
        for resume in ([], ["--resume"]):
            line = cli_error(capsys, ["train", str(cfg), *resume])
            assert f"training.output_dir {str(out)!r} " + BUSY.format(pid=first.pid) in line, line
        with pytest.raises(ConfigError, match=re.escape(BUSY.format(pid=first.pid))):
            train(RunConfig.from_dict(config(root, out, **STEPS)), resume=True)
        model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
        with pytest.raises(
            AdapterError, match=r"adapter directory .* " + re.escape(BUSY.format(pid=first.pid))
        ):
            save_adapter(model, out)
        assert tree(out) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr_path.read_text()[-2000:]
    _assert_same_adapter(out, alone)  # its own weights, not another run's


def test_after_the_holder_is_killed_resume_takes_over_and_resumes(root, processes, alone, tmp_path, caplog):
    out = tmp_path / "killed"
    cfg = _config_file(root, tmp_path, out)
    first = processes.run(["train", str(cfg)], tmp_path)
    _wait_for(out / "checkpoint-3" / COMPLETE_MARKER, first)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    with caplog.at_level("INFO"):
        assert main(["train", str(cfg), "--resume"]) == 0
    # the kernel released the dead holder's lock; the next holder names it and resumes its checkpoints
    assert f"the previous holder of {LOCK_FILE} (pid {first.pid} on " in caplog.text
    assert f"resuming from {out / 'checkpoint-'}" in caplog.text
    _assert_same_adapter(out, alone)


def test_a_foreign_directory_gets_no_lock_file(root, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match="holds files loramoe did not write"):
        train(RunConfig.from_dict(config(root, theirs, **STEPS)))
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_a_run_that_fails_after_its_claim_releases_the_directory(root, tmp_path):
    out = tmp_path / "run"
    cfg = config(root, out, **STEPS)
    cfg["data"]["max_length"] = 4096  # past the tiny model's context: refused after the claim
    with pytest.raises(ConfigError, match="longer than the model's context"):
        train(RunConfig.from_dict(cfg))
    assert (out / LOCK_FILE).is_file() and read_holder(out) == {}  # released cleanly, not left held
