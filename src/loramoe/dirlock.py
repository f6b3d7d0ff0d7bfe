"""One writer per directory: an exclusive lock that a process holds on a directory while it writes there.

Two loramoe processes writing one training output directory would each take the other's checkpoints for torn
leftovers of its own and replace them, and the final adapter would hold whichever run saved last. So a training
run locks its output directory before it writes anything there and holds the lock through its final save, and
``save_adapter`` refuses a directory that another process holds.

Design decisions:
- The lock is the operating system's (``fcntl.flock`` on ``.loramoe.lock`` inside the directory; ``msvcrt.locking``
  where there is no ``fcntl``), so the kernel releases it when its process ends in any way, SIGKILL included: a dead
  holder never blocks the next run, and there is no stale-lock guessing (pid files, timeouts).
- The lock file holds who has it (pid, host, start, command) for the message a second process prints; the holder
  empties it on a clean release, so a next holder that finds it filled knows the previous one died holding it and
  says so.
- The lock file is never removed: removing it would let a process that opened it just before hold a lock on a file
  no one else can see.
- On a file system without locks (some network and FUSE mounts) the run goes on with a warning that it cannot be
  protected from a second writer, rather than refusing every run there.
- Within one process the lock is re-entrant (the training run and the final ``save_adapter`` it calls), counted
  per directory; only when the last holder in the process releases it does the file lock go.
- A forked child (a data loader worker) closes its copies of the lock's descriptors at once: a lock lives as long
  as any descriptor of it, so otherwise a killed holder's children would keep its directory locked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from loramoe.errors import ConfigError, LoRAMoEError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("loramoe")

LOCK_FILE = ".loramoe.lock"
_MAX_INFO_BYTES = 4096
_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK}
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

# The directories this process holds: (st_dev, st_ino) -> [the lock file's descriptor, how many holders].
_HELD: dict[tuple[int, int], list[int]] = {}


def _forget_in_child() -> None:
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class DirectoryLock:
    """An exclusive lock on ``directory`` (created if needed) for as long as it is held; a context manager.

    Args:
        directory: the directory to hold.
        what: how messages name the directory (``"training.output_dir"``).
        error: the error type raised when another process holds it or it cannot be locked.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        what: str = "directory",
        error: type[LoRAMoEError] = ConfigError,
    ) -> None:
        self.directory, self.what, self.error = Path(directory), what, error
        self._key: tuple[int, int] | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock, or raise ``error`` naming the directory, the process that holds it and what to do."""
        if self._key is not None:
            return self
        path = self.directory / LOCK_FILE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key = _identity(self.directory)
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return self
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise self.error(
                f"{self.what} {str(self.directory)!r} cannot be written ({err.strerror or err}); choose a writable "
                "directory"
            ) from err
        try:
            _lock(fd)
        except OSError as err:
            os.close(fd)
            if err.errno in _BUSY:
                holder = read_holder(self.directory)
                for _ in range(5):  # the holder may be between emptying the file and describing itself
                    if holder:
                        break
                    time.sleep(0.02)
                    holder = read_holder(self.directory)
                raise self.error(
                    f"{self.what} {str(self.directory)!r} is in use by another loramoe process "
                    f"({_describe(holder)}); two processes writing one directory would destroy "
                    "each other's files. Wait for it to finish, or choose another output directory"
                ) from None
            if err.errno not in _UNSUPPORTED:
                raise self.error(
                    f"{self.what} {str(self.directory)!r}: cannot lock {LOCK_FILE} ({err.strerror or err}); "
                    "choose a directory on a local disk"
                ) from err
            # Some network and FUSE file systems have no locks: refusing them would refuse every run there.
            logger.warning(
                "%s: the file system cannot lock files (%s), so a second process writing there at the same time "
                "cannot be stopped; start one run per directory",
                self.directory,
                err.strerror or err,
            )
            fd = os.open(path, os.O_RDWR)
        previous = _read_info(fd)
        if previous:
            logger.warning(
                "%s: the previous holder of %s (%s) ended without releasing it (killed or crashed); taking over",
                self.directory,
                LOCK_FILE,
                _describe(previous),
            )
        _write_info(fd, _holder_info())
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Release the lock (the file lock itself once no holder in this process is left)."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        held = _HELD[key]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(held[0], 0)  # a clean end: the next holder finds no one to report
        os.close(held[0])  # closing the descriptor releases the lock

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def held_if_locked(
    directory: str | os.PathLike, *, what: str = "directory", error: type[LoRAMoEError] = ConfigError
) -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs if it has a lock file (it is, or was, a training run's output
    directory), so that nothing is written there while another process holds it. A directory that was never locked
    (an ordinary adapter folder) gets no lock file."""
    if (Path(directory) / LOCK_FILE).exists():
        with DirectoryLock(directory, what=what, error=error):
            yield
    else:
        yield


def read_holder(directory: str | os.PathLike) -> dict:
    """What the lock file says about its holder (empty when unreadable or cleanly released)."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read_info(fd)
    finally:
        os.close(fd)


def _identity(directory: Path) -> tuple[int, int]:
    st = os.stat(directory)
    return st.st_dev, st.st_ino


def _lock(fd: int) -> None:
    """Take the exclusive lock on ``fd`` without waiting; OSError (EAGAIN / EACCES) when another process has it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    import msvcrt  # Windows: a byte-range lock on the first byte, released when the process ends

    os.lseek(fd, 0, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _holder_info() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv)[:300],
    }


def _write_info(fd: int, info: dict) -> None:
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
    except OSError:
        pass  # the lock holds without its description; a second process then reports an unknown holder


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, _MAX_INFO_BYTES).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "process unknown"
    where = f"pid {info['pid']} on {info.get('host', '?')}, since {info.get('started', '?')}"
    return where + (f": {info['command']}" if info.get("command") else "")
