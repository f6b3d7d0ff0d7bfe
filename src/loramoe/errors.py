"""Exception types. Every user-facing failure is one of these, so the command line can print one line and exit 2.

Each is also a ``ValueError`` (a ``RuntimeError`` for training, an ``OSError`` where the file system is at fault)
so callers that catch the builtin types keep working.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class LoRAMoEError(Exception):
    """Base class of every error loramoe raises on purpose."""


class ConfigError(LoRAMoEError, ValueError):
    """A configuration value (dataclass field, YAML key, command-line override) is wrong."""


class DataError(LoRAMoEError, ValueError):
    """A data file or record is unusable. The message names the file, the line (or record index) and the field."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f" field {field!r}"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class AdapterError(LoRAMoEError, ValueError):
    """An adapter directory is missing, torn, tampered with, unsafe (pickle) or made for another base model."""


class TargetError(LoRAMoEError, ValueError):
    """``target_modules`` matched nothing, or the architecture has no known feed-forward targets."""


class TrainingError(LoRAMoEError, RuntimeError):
    """Training cannot go on (for example a NaN loss); the message says which step and what was kept."""


class FileSystemError(LoRAMoEError, OSError):
    """A file or folder cannot be read or written: the disk is full, a file-size limit is reached, permission is
    denied, the file system is read-only. The message names the path and what to do (``from_fault``)."""

    @classmethod
    def from_fault(cls, err: BaseException, path: str | os.PathLike, *, doing: str) -> FileSystemError:
        """The error for ``err``, met while ``doing`` (``"writing the checkpoint"``) at ``path``: the message says
        what failed at ``path``, why, and what to do."""
        reason, advice = _diagnose(err, Path(os.fsdecode(path)))
        return cls(f"{shown_path(path)}: {doing} failed ({reason}); {advice}")


# The messages of torch.save's writer when the OS refuses a write (no errno survives), and of a Rust library's
# I/O error (safetensors: "I/O error: File too large (os error 27)").
_TORCH_WRITE_FAULT = re.compile(r"PytorchStreamWriter failed|inline_container\.cc|file write failed")
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def is_write_fault(err: BaseException) -> bool:
    """Whether ``err`` is the file system refusing a read or write: an ``OSError``, torch.save's writer failing (a
    ``RuntimeError`` without the errno) or safetensors' I/O error."""
    if isinstance(err, OSError):
        return True
    if isinstance(err, RuntimeError) and _TORCH_WRITE_FAULT.search(str(err)):
        return True
    return _RUST_IO_ERROR.search(str(err)) is not None


def shown_path(path: str | os.PathLike) -> str:
    """``path`` for a one-line message: bytes that are not UTF-8, NUL and line breaks escaped."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _diagnose(err: BaseException, path: Path) -> tuple[str, str]:
    """What went wrong, and what the user can do about it."""
    code = getattr(err, "errno", None)
    if code is None and (rust := _RUST_IO_ERROR.search(str(err))):
        code = int(rust.group(1))
    if code is None:  # torch's writer: tell from the state of the file system
        if _free_bytes(path) < 1 << 20:
            code = errno.ENOSPC
        elif _file_size_limit() is not None:
            code = errno.EFBIG
    mount = shown_path(_mount_point(path))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device", f"free space on {mount} (the file system holding it)"
    if code == errno.EFBIG:
        limit = _file_size_limit()
        shown = f" of {limit} bytes" if limit is not None else ""
        return f"a file reached the file-size limit{shown}", "raise the limit (ulimit -f) or write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied", f"give this user access to {shown_path(path)}"
    if code == errno.EROFS:
        return "read-only file system", f"make {mount} writable or choose a path on another file system"
    if code == errno.EISDIR:
        return "a directory is where a file should be", f"move {shown_path(path)} out of the way"
    if code == errno.ENOTDIR:
        return "a file is where a directory should be", f"check {shown_path(path)}"
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return reason, f"check {shown_path(path)} and the disk"


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 1 << 62


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds (or would hold) ``path``."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        try:
            if os.path.ismount(folder):
                return folder
        except (OSError, ValueError):
            continue
    return Path(path.anchor or "/")
