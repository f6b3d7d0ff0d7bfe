"""Guarantee 7 of docs/reliability.md: the file system's faults are errors, not tracebacks, hangs or lost runs.

Every file a run writes gets the permissions a plain ``open()`` gives under the umask; the temporary file a kill
leaves is swept by the next process of the same run, and no other. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from loramoe.training.checkpoints import run_id_of
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import config, make_root, owned_run

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_a_run_writes_gets_the_mode_the_umask_gives(root, tmp_path, umask):
    """The adapter (safetensors writes it 0600 through its own file) and every other file: 0o666 less the umask."""
    out = tmp_path / "run"
    before = os.umask(umask)
    try:
        owned_run(root, out)
    finally:
        os.umask(before)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "adapter_model.safetensors" in files and out / "checkpoint-3" / "optimizer.pt" in files
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


KILLED_WRITER = """
import os, signal, sys
from loramoe.files import atomic_path, tagged_temp_files
with tagged_temp_files(sys.argv[2]), atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(os.urandom(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_temporary_file_a_kill_leaves_is_swept_by_the_next_process_of_the_run(root, tmp_path):
    """A process of the run killed half way through an atomic write of the adapter leaves its full-size temporary
    file; the resumed run removes it. A temporary file without the run id in its name is not provably the run's,
    and stays."""
    out = tmp_path / "run"
    owned_run(root, out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out / "adapter_model.safetensors"), run_id_of(out)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = out.glob(".adapter_model.safetensors.*.tmp")
    assert run_id_of(out) in left.name and left.stat().st_size == 1 << 20
    untagged = out / ".notes.txt.k3j4h5g6.tmp"
    untagged.write_text("not provably loramoe's")
    train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert not left.exists() and untagged.is_file()
    assert sorted(p.name for p in out.glob(".*")) == [untagged.name]
