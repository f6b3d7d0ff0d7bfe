"""A checkpoint's completion marker: written last, once the Trainer has finished the folder, holding the checksum
of every file in it; a checkpoint counts only while its marker verifies (``training/checkpoints.py`` says what a
run does with the ones that do not).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from loramoe.errors import ConfigError, LoRAMoEError
from loramoe.files import MAX_JSON_BYTES, atomic_write_text, not_regular, read_json, sha256_file

COMPLETE_MARKER = "loramoe_complete.json"
# In a checkpoint folder from its creation until its completion marker is written: the sign that a folder without a
# completion marker is a save a kill interrupted, not a finished checkpoint whose marker was deleted since.
SAVING_MARKER = ".loramoe_saving"


def is_real(path: Path, kind=stat.S_ISDIR) -> bool:
    """A directory (or ``kind``) itself, not a link to one: loramoe never follows a link out of the run."""
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def mark_complete(folder: Path, run_id: str | None = None) -> None:
    """Write the completion marker: the checksum of every file in ``folder`` (and the run id), atomically, last;
    then drop the saving marker, which a marker that verifies makes moot."""
    files = {
        p.name: _digest(p)
        for p in sorted(folder.iterdir())
        if is_real(p, stat.S_ISREG) and p.name not in (COMPLETE_MARKER, SAVING_MARKER)
    }
    body = {"files": files, **({"run_id": run_id} if run_id else {})}
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps(body, indent=1, sort_keys=True))
    (folder / SAVING_MARKER).unlink(missing_ok=True)


def save_interrupted(folder: Path) -> bool:
    """Whether ``folder`` is a save a kill interrupted: no completion marker, and still the saving marker it was
    created with (a finished checkpoint whose completion marker has gone since has neither)."""
    return not os.path.lexists(folder / COMPLETE_MARKER) and os.path.lexists(folder / SAVING_MARKER)


def _digest(path: Path) -> str:
    """The checksum of a file as the completion marker records it.

    A JSON file's checksum is that of its parsed content written canonically (sorted keys, no spaces), not of its
    bytes. Every JSON file in a checkpoint (trainer state, configs, tokenizer files, markers) is only ever read by
    parsing it, so its content is what it means: a user or a tool that re-indents it or reorders its keys has
    damaged nothing, and the checkpoint must stay resumable. What the checksum is for is still caught: a torn JSON
    file does not parse, and any changed value changes the canonical text. Other files are hashed byte for byte,
    and so is a JSON file too large to parse cheaply or one that does not parse.
    """
    if path.suffix == ".json" and path.stat().st_size <= MAX_JSON_BYTES:
        try:
            value = json.loads(path.read_bytes())
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            return "json:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        except (ValueError, RecursionError):
            pass
    return sha256_file(path)


def verification_problem(folder: Path) -> str | None:
    """What keeps ``folder`` from verifying (no completion marker, a file missing or changed), or None when every
    file its completion marker lists is there with its recorded checksum."""
    marker = folder / COMPLETE_MARKER
    if not is_real(folder):
        return "a link, not a folder: loramoe never follows one out of the run"
    if not os.path.lexists(marker):
        if save_interrupted(folder):
            return f"no {COMPLETE_MARKER}: its save did not finish"
        return f"no {COMPLETE_MARKER}, though its save was not interrupted: the marker was removed since"
    try:
        # Only regular files inside the folder are read, never through a link (to /dev/zero, or out of the run).
        linked = sorted(p.name for p in folder.iterdir() if p.is_symlink() or not_regular(p))
        if linked:
            return f"{linked[0]} is a link or a special file, not a regular file"
        files = read_json(marker, error=ConfigError, what="marker")["files"]
        if not isinstance(files, dict) or not files:
            return f"{COMPLETE_MARKER} lists no files"
        for name, digest in sorted(files.items()):
            path = folder / name
            if not isinstance(name, str) or Path(name).name != name or not path.exists():
                return f"{name} is missing"
            special = not_regular(path)
            if special is not None or not path.is_file():
                return f"{name} is {special or 'a directory'}, not a regular file"
            # a marker written before JSON files were checksummed by content holds the bytes' checksum
            if digest != _digest(path) and not (path.suffix == ".json" and digest == sha256_file(path)):
                return f"{name} differs from the checksum in {COMPLETE_MARKER}"
    except (OSError, LoRAMoEError, KeyError, TypeError, AttributeError) as err:
        return f"{COMPLETE_MARKER} cannot be read ({err})"
    return None


def checkpoint_is_complete(folder: Path) -> bool:
    """Whether ``folder``'s completion marker lists files that are all there with their recorded checksums."""
    return verification_problem(folder) is None
