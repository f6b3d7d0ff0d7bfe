"""Checkpoints that survive crashes: a completion marker with checksums, written last, and resume-time checks.

A checkpoint counts only once ``loramoe_complete.json``, holding the sha256 of every file in the folder, has been
written (atomically) after the Trainer finished the folder. A resume takes the newest checkpoint whose marker
verifies, says which torn ones it skipped, and removes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from loramoe.files import atomic_write_text, sha256_file

logger = logging.getLogger("loramoe.train")

COMPLETE_MARKER = "loramoe_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    """After a checkpoint is fully written, record the checksum of each of its files in a marker, atomically."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder)
        return control


def mark_complete(folder: Path) -> None:
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER
    }
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=1, sort_keys=True))


def checkpoint_is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return bool(files) and all(sha256_file(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(root: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``root``, newest (largest N) first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good_checkpoint(output_dir: str | os.PathLike, *, quiet: bool = False) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose completion marker verifies; torn ones are reported."""
    for folder in list_checkpoints(Path(output_dir)):
        if checkpoint_is_complete(folder):
            return str(folder)
        if not quiet:
            logger.warning(
                "skipping %s: torn or incomplete checkpoint (no valid %s); using an older one",
                folder,
                COMPLETE_MARKER,
            )
    return None


def remove_torn_checkpoints(root: Path, keep: str | None) -> None:
    """Delete the checkpoints newer than ``keep`` (all when None): they are torn, and the resumed run would
    otherwise write its own checkpoint of the same step over their leftovers."""
    for folder in list_checkpoints(root):
        if keep is not None and folder == Path(keep):
            return
        logger.warning("removing torn checkpoint %s", folder)
        shutil.rmtree(folder)
