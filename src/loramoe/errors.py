"""Exception types. Every user-facing failure is one of these, so the command line can print one line and exit 2.

Each is also a ``ValueError`` (or ``OSError`` where the filesystem is at fault) so callers that catch the
builtin types keep working.
"""

from __future__ import annotations


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
