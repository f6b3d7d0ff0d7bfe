"""The directory lock: exclusive between processes, re-entrant within one, free again when its holder dies, and
never created where nothing was locked before. The guarantee it serves (one writer per training output directory)
is tested with real training processes in ``tests/guarantees/test_one_writer_per_directory.py``."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import loramoe.dirlock as dirlock
from loramoe.dirlock import LOCK_FILE, DirectoryLock, held_if_locked, read_holder
from loramoe.errors import AdapterError, ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"
HOLD = (  # holds the lock, and forks a child that outlives it (as a data loader worker may)
    "import os, sys, time\n"
    "from loramoe.dirlock import DirectoryLock\n"
    "DirectoryLock(sys.argv[1]).acquire()\n"
    "child = os.fork()\n"
    "if child == 0:\n"
    "    time.sleep(120)\n"
    "    os._exit(0)\n"
    "print(child, flush=True)\n"
    "sys.stdin.read()\n"
)


def test_another_process_holding_it_is_named_and_its_death_frees_it_even_with_a_child_alive(tmp_path, caplog):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    child = int(holder.stdout.readline())
    try:
        assert read_holder(folder)["pid"] == holder.pid
        with pytest.raises(ConfigError, match=rf"directory '{folder}' is in use .*\(pid {holder.pid} on "):
            DirectoryLock(folder).acquire()
        busy = pytest.raises(AdapterError, match=rf"^adapter directory '{folder}' is in use")
        with busy, held_if_locked(folder, what="adapter directory", error=AdapterError):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        os.kill(child, 0)  # the forked child is still alive, and the lock is free all the same
        with caplog.at_level("WARNING", logger="loramoe"), DirectoryLock(folder):
            assert read_holder(folder)["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
    assert f"previous holder of {LOCK_FILE} (pid {holder.pid} on " in caplog.text


def test_re_entrant_in_one_process_and_a_clean_release_leaves_no_holder(tmp_path):
    folder = tmp_path / "out"
    with DirectoryLock(folder):
        with DirectoryLock(folder):
            pass
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()  # still held
    assert (folder / LOCK_FILE).read_text() == "" and read_holder(folder) == {}
    plain = tmp_path / "adapter"
    plain.mkdir()
    with held_if_locked(plain):  # never locked: it stays without a lock file
        pass
    assert list(plain.iterdir()) == []


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(dirlock, "_lock", no_locks)
    with caplog.at_level("WARNING", logger="loramoe"), DirectoryLock(tmp_path / "out"):
        pass
    assert "cannot lock files (No locks available)" in caplog.text
    monkeypatch.setattr(dirlock, "_lock", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(ConfigError, match=r"cannot lock \.loramoe\.lock \(I/O error\)"):
        DirectoryLock(tmp_path / "other").acquire()
