"""Guarantee 7 of docs/reliability.md: the file system's faults are errors, not tracebacks, hangs or lost runs.

A file-size limit (RLIMIT_FSIZE, in real ``loramoe train`` processes) or a full disk during a checkpoint or the
final save ends in one line naming the path and what to do, and ``--resume`` completes the run once the limit is
raised or space is freed; an unreadable data file, a directory where the adapter should be are one line too. A
checkpoint file linked to ``/dev/zero`` or a checkpoint that is a link is refused without being followed, and
rotation keeps a read-only checkpoint with a warning and trains on. Every
file a run writes gets the permissions a plain ``open()`` gives under the umask; the temporary file a kill leaves is
swept by the next process of the same run, and no other. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from loramoe.errors import ConfigError, FileSystemError
from loramoe.training.checkpoints import latest_good_checkpoint, run_id_of
from loramoe.training.completion import checkpoint_is_complete
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import cli_error, config, make_root, owned_run

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
    assert sorted(p.name for p in out.glob(".*.tmp")) == [untagged.name]


def _start_train(cfg: Path, *, file_size_limit: int) -> subprocess.Popen:
    """``python -m loramoe train cfg`` under umask 022 and a file-size limit. SIGXFSZ, which would kill
    the process at the limit, is ignored, so the write fails with EFBIG as it does on a full disk with ENOSPC."""

    def limit() -> None:
        os.umask(0o022)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "loramoe", "train", str(cfg)]
    return subprocess.Popen(
        argv, env=env, preexec_fn=limit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _error_line(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("loramoe ")]
    assert len(lines) == 1, err
    return lines[0]


# The tiny run's largest file is a checkpoint's optimizer state (38 KB), then the adapter (13 KB): "ckpt" reaches its
# limit writing checkpoint-3, "final" (no checkpoints) writing the final adapter.
RUNS = {"ckpt": {"max_steps": 6}, "final": {"save_strategy": "no"}}
LIMITS = {"ckpt": 20_000, "final": 10_000}


def _write_config(root: Path, tmp_path: Path, name: str) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config(root, tmp_path / name, **RUNS[name])))
    return cfg


def test_a_file_size_limit_during_a_checkpoint_or_the_final_save_is_one_line_and_resume_completes(
    root, tmp_path
):
    """Two real runs under a file-size limit: one reaches it writing ``checkpoint-3`` (its optimizer state is the
    largest file), the other, without checkpoints, writing the final adapter. Both exit 2 with one line naming the
    path, the limit and ``--resume``; nothing half-written is used, and ``--resume`` without the limit completes
    them: the checkpoint run from the start (its torn checkpoint-3 is set aside), with every file 0644."""
    runs = {
        name: _start_train(_write_config(root, tmp_path, name), file_size_limit=limit)
        for name, limit in LIMITS.items()
    }
    lines = {name: _error_line(proc) for name, proc in runs.items()}
    assert lines["ckpt"].startswith(f"loramoe train: error: {tmp_path / 'ckpt' / 'checkpoint-3'}: "), lines
    assert lines["final"].startswith(
        f"loramoe train: error: {tmp_path / 'final' / 'adapter_model.safetensors'}: "
    )
    for name, line in lines.items():
        assert f"file-size limit of {LIMITS[name]} bytes" in line, line
        assert line.endswith("then run again with --resume"), line
    assert latest_good_checkpoint(tmp_path / "ckpt") is None  # checkpoint-3 is torn: no completion marker
    assert not (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    before = os.umask(0o022)
    try:  # the limit raised: the same runs go on (in this process, to save a second start of two processes)
        for name in LIMITS:
            train(RunConfig.from_dict(config(root, tmp_path / name, **RUNS[name])), resume=True)
    finally:
        os.umask(before)
    assert latest_good_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "checkpoint-6")
    for name in LIMITS:
        out = tmp_path / name
        assert (out / "adapter_config.json").is_file() and (out / "train_results.json").is_file()
        files = [p for p in out.rglob("*") if p.is_file()]
        assert not [p for p in files if p.name.endswith(".tmp")]
        assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}


def test_a_directory_where_the_adapter_goes_is_one_line_naming_it(root, tmp_path, capsys):
    """A fault of the final save that holds for root too: the rename onto ``adapter_model.safetensors`` fails."""
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, out, save_strategy="no")))
    out.mkdir()
    owned_run(root, out, save_strategy="no", max_steps=1)
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.safetensors").mkdir()
    line = cli_error(capsys, ["train", str(cfg), "--resume"])
    assert (
        f"{out / 'adapter_model.safetensors'}: writing failed (a directory is where a file should be)" in line
    )
    assert line.endswith("then run again with --resume") and not list(out.glob(".*.tmp"))


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/mem is Linux's")
def test_a_data_file_that_cannot_be_read_is_one_line_naming_it(root, tmp_path, capsys):
    """``/proc/self/mem`` is a regular file whose first byte cannot be read (EIO), for root too."""
    data = "/proc/self/mem"
    run = config(root, tmp_path / "run")
    run["data"]["sources"] = [{"path": data}]
    with pytest.raises(
        FileSystemError, match=r"^/proc/self/mem: reading the data file failed \(Input/output error\)"
    ):
        train(RunConfig.from_dict(run))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert "/proc/self/mem: reading the data file failed" in cli_error(capsys, ["train", str(cfg)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions say (the EIO test above "
                    "covers an unreadable data file for root)")  # fmt: skip
def test_a_data_file_without_read_permission_is_one_line_naming_it(root, tmp_path, capsys):
    data = tmp_path / "locked.jsonl"
    shutil.copy(root / "good.jsonl", data)
    data.chmod(0)
    run = config(root, tmp_path / "run")
    run["data"]["sources"] = [{"path": str(data)}]
    with pytest.raises(
        FileSystemError,
        match=rf"^{re.escape(str(data))}: reading the data file failed \(permission denied\); give",
    ):
        train(RunConfig.from_dict(run))
    data.chmod(0o644)  # the user fixes it: the same run goes on
    train(RunConfig.from_dict(run), resume=True)


VERIFY = "import sys\nfrom loramoe.training.checkpoints import latest_good_checkpoint\nprint(latest_good_checkpoint(sys.argv[1]))"


def test_a_checkpoint_file_linked_to_dev_zero_is_refused_at_once_and_the_resume_goes_on(
    root, tmp_path, caplog
):
    """The newest checkpoint's optimizer state replaced by a link to ``/dev/zero``: its verification reads no link
    (it would hash zeros forever), so the resume takes checkpoint-3 within seconds and trains on. A whole checkpoint
    folder that is a link (to a copy of checkpoint-3 outside the run) is refused by name, and nothing it points to
    is touched."""
    out = tmp_path / "run"
    owned_run(root, out, max_steps=6)
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    (out / "checkpoint-6" / "optimizer.pt").symlink_to("/dev/zero")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    found = subprocess.run(
        [sys.executable, "-c", VERIFY, str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert found.stdout.strip() == str(out / "checkpoint-3"), found.stderr
    outside = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoint-3", outside)
    (out / "checkpoint-12").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"checkpoint-12: a symbolic link, which loramoe never follows"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    (out / "checkpoint-12").unlink()  # the user moves it away
    with caplog.at_level("INFO", logger="loramoe.train"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")
    assert sorted(p.name for p in outside.iterdir()) == sorted(
        p.name for p in (out / "checkpoint-3").iterdir()
    )


def _read_only(folder: Path) -> bool:
    """Make ``folder``'s entries impossible to remove: mode 0555, or for root (whom modes do not stop) the
    immutable attribute, where the file system has it. False when neither can be done."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def _writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_rotation_keeps_a_checkpoint_it_cannot_remove_warns_and_trains_on(root, tmp_path, caplog):
    out = tmp_path / "run"
    owned_run(root, out, save_total_limit=1)
    old = out / "checkpoint-3"
    if not _read_only(old):
        pytest.skip(
            "running as root, and this file system has no immutable attribute (chattr +i) to stop root"
        )
    try:
        with caplog.at_level("WARNING", logger="loramoe.train"):
            train(RunConfig.from_dict(config(root, out, max_steps=9, save_total_limit=1)), resume=True)
    finally:
        _writable(old)
    assert f"keeping {old}, training goes on: {old}: removing the checkpoint" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-9"]
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")
    assert not list(out.glob(".checkpoint-*")) and checkpoint_is_complete(
        old
    )  # kept under its own name, whole


def _set(run: dict, field: str, value: str) -> dict:
    *parents, last = field.split(".")
    node = run
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[last] = value
    return run


FIELDS = {
    "training.output_dir": "training.output_dir",
    "data.sources.0.path": "data: sources[0]: path",
    "model": "model",
}


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("training.output_dir", "run\0x"),
        ("data.sources.0.path", "good\0.jsonl"),
        ("model", "ba\0se"),
        (
            "training.output_dir",
            "run\udcffx",
        ),  # a byte that is not UTF-8, as Python reads it from a command line
        ("data.sources.0.path", "good\udcff.jsonl"),
    ],
)
def test_a_nul_or_undecodable_byte_in_a_path_is_one_line_naming_the_field(root, tmp_path, capsys, field, bad):
    """No file system has a NUL in a name, and a name that is not UTF-8 cannot be written into the run's UTF-8
    records: both are refused before anything is created, in the library and on the command line."""
    value = bad if field == "model" else str(tmp_path / bad)
    run = _set(config(root, tmp_path / "run"), field, value)
    with pytest.raises(
        ConfigError, match=r"without NUL bytes, in UTF-8 \(rename a file or folder whose name is not\)"
    ):
        RunConfig.from_dict(run)
    cfg = tmp_path / "run.yaml"
    if "\0" in value:  # no command line can hold a NUL byte; a YAML file can ("\0")
        cfg.write_text(yaml.safe_dump(run))
        argv = ["train", str(cfg)]
    else:  # nor can YAML text hold a byte that is not UTF-8; a command line can
        cfg.write_text(yaml.safe_dump(config(root, tmp_path / "run")))
        argv = ["train", str(cfg), f"{field}={value}"]
    line = cli_error(capsys, argv)
    assert (
        f"{FIELDS[field]} must be" in line and "without NUL bytes, in UTF-8" in line and "\0" not in line
    ), line
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run?x"))


@contextlib.contextmanager
def _small_file_system(folder: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``size`` mounted on ``folder`` (root only, where mounting is allowed); yields a function that
    resizes it, the stand-in for a user freeing space."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"a full disk needs a small file system, and mounting one failed: {mounted.stderr.decode().strip()}"
        )

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(folder)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system to fill needs root")
def test_a_full_disk_during_a_checkpoint_names_the_file_system_and_resume_completes_once_space_is_freed(
    root, tmp_path
):
    """A real ENOSPC: a 64 KiB file system fills while ``checkpoint-3`` is written (torch.save's writer, which
    reports no errno: the message is told from the free space). Once the file system is grown, the resume completes."""
    disk = tmp_path / "disk"
    with _small_file_system(disk, "64k") as resize:
        run = config(root, disk / "run", max_steps=6)
        with pytest.raises(FileSystemError) as failed:
            train(RunConfig.from_dict(run))
        assert str(failed.value).startswith(f"{disk / 'run' / 'checkpoint-3'}"), failed.value
        assert f"(no space left on the device); free space on {disk} (the file system holding it)" in str(
            failed.value
        )
        assert str(failed.value).endswith("then run again with --resume")
        resize("8m")
        train(RunConfig.from_dict(run), resume=True)
        assert latest_good_checkpoint(disk / "run") == str(disk / "run" / "checkpoint-6")
        assert (disk / "run" / "adapter_config.json").is_file()
