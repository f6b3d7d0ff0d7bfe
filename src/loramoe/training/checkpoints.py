"""Checkpoints that survive crashes, and ownership: loramoe deletes only what it wrote and verified.

Ownership. A run claims its output directory once, by writing ``loramoe_owner.json`` (a random run id, and the
directory's device and inode number) into a new or empty directory; a directory that holds other files and no
marker proving it is loramoe's is refused before anything is written. The marker proves the directory only where
it was written: a copy of it in another folder names another inode, so copying the marker (or the run config
``loramoe_run.json``) into a folder does not make loramoe write over that folder's files. A marker without a
matching inode (written by an earlier loramoe, or a whole run copied or moved to another file system) still proves
the directory when a complete checkpoint of its run is there, which a copied marker alone does not bring; the
claim then records the directory's own inode. The claim is made under the directory's lock (``loramoe.dirlock``),
held by ``train`` until its final save, so no two processes write one directory at a time.
Before the Trainer writes a ``checkpoint-N`` folder, the same marker (with the run id) is written into it first.
A folder counts as this run's only when its marker names this run's id; a checkpoint written by an earlier loramoe
(no owner marker) counts when its completion marker verifies. Every deletion goes through ``_remove_owned``, which
checks that proof right before it removes anything, so a folder loramoe cannot prove is its own (another project's
``checkpoint-500``) is never deleted or written over: the run stops and says to move it.

Completion. A checkpoint counts only once ``loramoe_complete.json``, holding the run id and the sha256 of every
file in the folder, has been written (atomically) after the Trainer finished the folder. A resume takes the newest
checkpoint of this run whose marker verifies and says which ones it skipped and why. Those without a completion
marker and still holding the saving marker the folder was created with are saves a kill interrupted: the resumed
run removes them (they are its own) to write the same steps again. Every other one that does not verify was
complete (its marker no longer verifies, or was deleted) or cannot be vouched for: it is never removed, only set
aside as ``checkpoint-N.failed-verification`` so that nothing is lost and the user can look at it.

Rotation (``save_total_limit``) is done here, not by transformers: only after the new checkpoint's marker verifies,
and only among this run's complete checkpoints, so a kill at any moment leaves at least the last good one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path

from loramoe.dirlock import LOCK_FILE
from loramoe.errors import ConfigError, FileSystemError, LoRAMoEError, TrainingError
from loramoe.files import (
    atomic_write_text,
    fsync_dir,
    leftover_temp_files,
    read_json,
)
from loramoe.training.completion import (
    COMPLETE_MARKER,
    SAVING_MARKER,
    checkpoint_is_complete,
    is_real,
    save_interrupted,
    verification_problem,
)

logger = logging.getLogger("loramoe.train")

OWNER_MARKER = "loramoe_owner.json"
LEGACY_RUN_FILE = "loramoe_run.json"  # an output directory an earlier loramoe (before owner markers) wrote
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a claim killed half way leaves in a new directory: the owner marker's temporary file, or the probe file;
# and the lock file, which a process that lost the race for the directory may have created.
_CLAIM_LEFTOVER = re.compile(
    rf"^(\.{re.escape(OWNER_MARKER)}\..*\.tmp|\.loramoe-probe-\d+|{re.escape(LOCK_FILE)})$"
)


# ---- the output directory ---------------------------------------------------------------------------------------


def run_id_of(output_dir: str | os.PathLike) -> str | None:
    """The run id in ``output_dir``'s owner marker, or None when it has none (or an unreadable one)."""
    return _marker_id(Path(output_dir) / OWNER_MARKER)


def _read_marker(marker: Path) -> dict | None:
    try:
        data = read_json(marker, error=ConfigError, what="marker", max_bytes=1 << 16)
    except (OSError, LoRAMoEError):
        return None
    return data if isinstance(data, dict) else None


def _marker_id(marker: Path) -> str | None:
    run_id = (_read_marker(marker) or {}).get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def _directory_identity(folder: Path) -> list[int]:
    """What a copy of a file cannot carry to another folder: the folder's device and inode number."""
    st = os.stat(folder)
    return [st.st_dev, st.st_ino]


def proven_run_id(output_dir: str | os.PathLike) -> str | None:
    """The run id that provably owns ``output_dir``: its owner marker names this directory's inode, or (a marker of
    an earlier loramoe, or of a whole run copied or moved here) a complete checkpoint of the marker's run is there.
    None when nothing proves it (no marker, or a marker copied into a folder without that run's checkpoints)."""
    out = Path(output_dir)
    marker = _read_marker(out / OWNER_MARKER) or {}
    run_id = marker.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        return None
    if marker.get("directory") == _directory_identity(out):
        return run_id
    return run_id if _has_complete_checkpoint(out, run_id) else None


def _has_complete_checkpoint(out: Path, run_id: str | None) -> bool:
    return any(
        is_owned(folder, run_id) and checkpoint_is_complete(folder) for folder in list_checkpoints(out)
    )


def _is_earlier_loramoe_output(out: Path) -> bool:
    """An output directory of a loramoe from before owner markers: its run config and at least one checkpoint whose
    completion marker verifies (not only a run config, which a user may have copied into any folder)."""
    return (
        not (out / OWNER_MARKER).exists()
        and (out / LEGACY_RUN_FILE).is_file()
        and _has_complete_checkpoint(out, None)
    )


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raise ``ConfigError`` unless loramoe may write into ``output_dir``: it does not exist, is empty, or is
    provably a loramoe output directory (``proven_run_id``, or an earlier loramoe's). Writes nothing."""
    out = Path(output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"training.output_dir {str(out)!r} is a file; give a directory (it is created)")
    if proven_run_id(out) or _is_earlier_loramoe_output(out):
        return
    # A marker that proves nothing here (copied from another directory) is no content of the user's to keep.
    foreign = sorted(
        p.name for p in out.iterdir() if not _CLAIM_LEFTOVER.match(p.name) and p.name != OWNER_MARKER
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        copied = (
            f" (its {OWNER_MARKER} proves nothing here: it was written in another directory, or by an earlier "
            "loramoe, and no complete checkpoint of its run is there)"
            if (out / OWNER_MARKER).exists()
            else ""
        )
        raise ConfigError(
            f"training.output_dir {str(out)!r} holds files loramoe did not write ({shown}){copied}; loramoe writes "
            "only into a new or empty directory or one of its own runs, so nothing there is overwritten or deleted. "
            "Choose another output_dir"
        )


def claim_output_dir(output_dir: str | os.PathLike) -> str:
    """Create ``output_dir`` if needed, make sure it can be written (a probe file), and return its run id, writing
    the owner marker (with the directory's inode) when the directory is new or its marker names another inode.
    Call it holding the directory's lock (``loramoe.dirlock.DirectoryLock``).

    Raises:
        ConfigError: the directory is not loramoe's (``check_output_dir``), or cannot be created or written.
    """
    out = Path(output_dir)
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".loramoe-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        marker = _read_marker(out / OWNER_MARKER) or {}
        run_id = proven_run_id(out)
        if run_id is None or marker.get("directory") != _directory_identity(out):
            run_id = run_id or uuid.uuid4().hex
            created = marker.get("created") if run_id == marker.get("run_id") else None
            marker = {
                "run_id": run_id,
                "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "directory": _directory_identity(out),
            }
            atomic_write_text(out / OWNER_MARKER, json.dumps(marker, indent=1) + "\n")
    except OSError as err:
        raise ConfigError(
            f"training.output_dir {str(out)!r} cannot be written ({err.strerror or err}); choose a writable "
            "directory"
        ) from err
    return run_id


# ---- checkpoint folders -----------------------------------------------------------------------------------------


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders in ``root``, newest (largest N) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p.is_symlink() or is_real(p))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def is_owned(folder: Path, run_id: str | None) -> bool:
    """Whether ``folder`` provably belongs to run ``run_id``: its owner marker names the run, or (a checkpoint of
    an earlier loramoe, written before owner markers) it has no owner marker and its completion marker, which only
    loramoe writes, verifies. ``run_id`` None (a directory not claimed yet) owns only such earlier checkpoints.
    A link is never owned: loramoe makes none."""
    if not is_real(folder):
        return False
    marker = folder / OWNER_MARKER
    if os.path.lexists(marker):
        return run_id is not None and is_real(marker, stat.S_ISREG) and _marker_id(marker) == run_id
    return checkpoint_is_complete(folder)


def foreign_checkpoints(output_dir: str | os.PathLike, run_id: str | None) -> list[Path]:
    """The ``checkpoint-N`` folders in ``output_dir`` that run ``run_id`` cannot prove are its own."""
    return [folder for folder in list_checkpoints(output_dir) if not is_owned(folder, run_id)]


def refuse_foreign(output_dir: str | os.PathLike, run_id: str | None) -> None:
    """Raise ``ConfigError`` naming the first checkpoint folder in ``output_dir`` that is not this run's."""
    foreign = foreign_checkpoints(output_dir, run_id)
    if foreign:
        link = foreign[0].is_symlink()
        raise ConfigError(
            f"{foreign[0]}: "
            + ("a symbolic link, which loramoe never follows" if link else "not written by this loramoe run")
            + f" (no {OWNER_MARKER} naming it, no verified {COMPLETE_MARKER}); loramoe never deletes or writes over "
            "a folder it cannot prove is its own. Move it out of training.output_dir, or choose another output_dir"
        )


def begin_checkpoint(folder: Path, run_id: str) -> None:
    """Make ``folder`` this run's before the Trainer writes into it: remove a torn leftover of this run (a crash
    while writing the same step), refuse anything else that is there, then create the folder with the owner
    marker already inside (built under a temporary name and renamed, so a kill never leaves it without one)."""
    _sweep_leftovers(folder.parent, run_id)
    if folder.exists():
        if not is_owned(folder, run_id):
            refuse_foreign(folder.parent, run_id)
            raise TrainingError(f"{folder}: a file, not this run's checkpoint; move it away")
        _clear_owned(folder, run_id, "a checkpoint of the same step")
    new = folder.parent / f".{folder.name}.new-{run_id}"
    new.mkdir()
    atomic_write_text(new / OWNER_MARKER, json.dumps({"run_id": run_id}) + "\n")
    (new / SAVING_MARKER).touch()
    os.rename(new, folder)
    fsync_dir(folder.parent)


def latest_good_checkpoint(
    output_dir: str | os.PathLike, *, quiet: bool = False, run_id: str | None = None
) -> str | None:
    """The newest ``checkpoint-N`` of this run (``run_id``, default: the output directory's) whose completion
    marker verifies; the ones skipped are reported with the reason, other runs' folders are not considered."""
    run_id = run_id or run_id_of(output_dir)
    for folder in list_checkpoints(output_dir):
        if not is_owned(folder, run_id):
            continue
        problem = verification_problem(folder)
        if problem is None:
            return str(folder)
        if not quiet:
            logger.warning("skipping %s (%s); using an older checkpoint", folder, problem)
    return None


def remove_torn_checkpoints(output_dir: str | os.PathLike, keep: str | None, run_id: str) -> None:
    """Clear this run's checkpoints newer than ``keep`` (all of them when None), which the resumed run writes
    again: remove the unfinished ones (a save a kill interrupted), set aside the ones that were complete and no
    longer verify (``_clear_owned``)."""
    _sweep_leftovers(Path(output_dir), run_id)
    for folder in list_checkpoints(output_dir):
        if keep is not None and folder == Path(keep):
            return
        _clear_owned(folder, run_id, "newer than the checkpoint the run resumes from")


def _clear_owned(folder: Path, run_id: str, why: str) -> None:
    """Make way for this run's new checkpoint at ``folder``'s step. A folder without a completion marker that still
    holds its saving marker is a save of this run that a kill interrupted, and is removed. Any other was finished
    (or loramoe cannot tell): whatever has happened to it since (a file edited, truncated or replaced, its
    completion marker deleted), it is never removed, only renamed aside under a name that says why, with a warning
    naming it."""
    if save_interrupted(folder):
        _remove_owned(folder, run_id, f"an unfinished save, {why}")
        return
    problem = verification_problem(folder) or "complete, but the run writes this step again"
    for n in range(1, 1000):
        aside = folder.with_name(f"{folder.name}.failed-verification" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            break
    os.rename(folder, aside)
    fsync_dir(folder.parent)
    logger.warning("%s (%s): set aside as %s, untouched; the run does not use it", folder, problem, aside)


def rotate_checkpoints(
    output_dir: str | os.PathLike, run_id: str, limit: int | None, protect: str | None = None
) -> None:
    """Keep this run's newest ``limit`` complete checkpoints (and ``protect``, the best one), delete its older
    complete ones. Call it only after the newest checkpoint's marker has verified."""
    if not limit:
        return
    good = [f for f in list_checkpoints(output_dir) if is_owned(f, run_id) and checkpoint_is_complete(f)]
    keep = set(good[:limit]) | ({Path(protect)} if protect else set())
    for folder in good:
        if folder not in keep:
            try:  # a read-only checkpoint: one old checkpoint more is no reason to stop training
                _remove_owned(folder, run_id, f"older than the newest {limit} (save_total_limit)")
            except LoRAMoEError as err:
                logger.warning("keeping %s, training goes on: %s", folder, err)


def sweep_leftovers(output_dir: str | os.PathLike, run_id: str) -> None:
    """Finish what a killed process of run ``run_id`` left in ``output_dir``: its hidden checkpoint folders being
    created or removed, and the temporary files of its atomic writes. Call it only while no other process of the
    same run writes there."""
    _sweep_leftovers(Path(output_dir), run_id)


def _remove_owned(folder: Path, run_id: str, why: str) -> None:
    """The only way loramoe deletes a checkpoint: after checking, right here, that it is this run's. The folder is
    first renamed to a hidden name holding the run id (atomic), so a kill during the removal leaves no half
    checkpoint without its marker, only a hidden folder that ``_sweep_leftovers`` finishes."""
    if not is_owned(folder, run_id):
        raise TrainingError(f"{folder}: not removed, it is not this run's ({why}); move it away")
    logger.warning("removing %s: %s", folder, why)
    doomed = folder.parent / f".{folder.name}.removing-{run_id}"
    try:
        if is_real(doomed):  # an earlier removal of the same folder, interrupted: named by this run's id
            shutil.rmtree(doomed)
        os.rename(folder, doomed)
        fsync_dir(folder.parent)
        shutil.rmtree(doomed)
    except OSError as err:  # read-only: when nothing of it is gone, it stays a checkpoint under its own name
        if not folder.exists() and checkpoint_is_complete(doomed):
            os.rename(doomed, folder)
        raise FileSystemError.from_fault(err, folder, doing=f"removing the checkpoint ({why})") from err


def _sweep_leftovers(run_dir: Path, run_id: str) -> None:
    """Finish what a kill interrupted: this run's hidden ``.checkpoint-N.new-<run id>`` (being created) and
    ``.checkpoint-N.removing-<run id>`` (being removed) folders, and the temporary files of its atomic writes into
    ``run_dir`` (``.<name>.<run id>-<random>.tmp``, see ``files.tagged_temp_files``). Only this run makes folders
    and files with these names, so the name, holding the run id, is the proof they are its own."""
    for leftover in [
        *run_dir.glob(f".checkpoint-*.new-{run_id}"),
        *run_dir.glob(f".checkpoint-*.removing-{run_id}"),
    ]:
        try:
            if is_real(leftover):
                shutil.rmtree(leftover)
        except OSError as err:  # read-only: it stays hidden, and the next process of the run tries again
            logger.warning("leaving %s as it is: %s", leftover, err.strerror or err)
    for leftover in leftover_temp_files(run_dir, run_id):
        leftover.unlink(missing_ok=True)
